"""Run the shipped recipes end to end (teacher, then CTM distillation) and print the bar table:
wall time of each stage and the CTM student's 1-NFE score against the teacher's 18-step Heun.

    python benchmarks/recipes.py [--recipe toy|digits|all] [--out runs/recipes]

Issue 3's bar: each stage under ~5 minutes on 2 CPUs; CTM at 1 NFE within 1.3x of the teacher.
Wall times depend on the machine (two 2-core machines of one kind ran the same recipe in 281 s and 418 s),
so the table starts with this machine's fp32 matmul rate to compare them by.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ctm_core.config import load_config
from ctm_core.train import train

RECIPES = {
    "toy": ("configs/toy_teacher.yaml", "configs/toy_ctm.yaml", "sw2", ["eval.num_samples=5000", "eval.every=0"]),
    "digits": ("configs/digits_teacher.yaml", "configs/digits_ctm.yaml", "fd_digits", []),
}
REPO = Path(__file__).resolve().parents[1]


def cpu_gflops(size: int = 2048, repeats: int = 10) -> float:
    """This machine's fp32 matmul rate with torch's threads (GFLOP/s): a yardstick for the wall times."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def run_recipe(name: str, out: Path, extra: list[str]) -> dict:
    teacher_cfg, ctm_cfg, metric, overrides = RECIPES[name]
    row: dict = {"recipe": name, "metric": metric}
    start = time.perf_counter()
    teacher = train(load_config(REPO / teacher_cfg, overrides + extra + [f"runtime.out_dir={out / name / 'teacher'}"]))
    row["teacher_s"] = time.perf_counter() - start
    start = time.perf_counter()
    student = train(load_config(REPO / ctm_cfg, overrides + extra + [f"runtime.out_dir={out / name / 'ctm'}",
                                                                     f"teacher.checkpoint={teacher.out_dir}"]))
    row["ctm_s"] = time.perf_counter() - start
    row["teacher_heun_nfe35"] = student.metrics[f"eval/{metric}/teacher_nfe35"]
    row["ctm_nfe1"] = student.metrics[f"eval/{metric}/nfe1"]
    row["ctm_nfe2"] = student.metrics[f"eval/{metric}/nfe2"]
    row["ratio_nfe1"] = row["ctm_nfe1"] / row["teacher_heun_nfe35"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=[*RECIPES, "all"], default="all")
    parser.add_argument("--out", type=Path, default=Path("runs/recipes"))
    parser.add_argument("--set", dest="overrides", action="append", default=["runtime.resume=false"])
    args = parser.parse_args()
    import torch

    print(f"machine: {cpu_gflops():.0f} GFLOP/s fp32 matmul on {torch.get_num_threads()} threads", flush=True)
    rows = [run_recipe(name, args.out, args.overrides) for name in (RECIPES if args.recipe == "all" else [args.recipe])]
    header = ["recipe", "metric", "teacher_s", "ctm_s", "teacher_heun_nfe35", "ctm_nfe1", "ctm_nfe2", "ratio_nfe1"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{row[h]:.4g}" if isinstance(row[h], float) else str(row[h]) for h in header) + " |")
    (args.out / "recipes.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
