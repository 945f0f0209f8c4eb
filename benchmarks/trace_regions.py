"""Where the GPU time of a profiled training step goes: a Chrome trace from
`benchmarks/trainer_gpu.py --profile-steps N` summed by the step's labelled ranges
(record_function in ctm_core: ctm/solver, ctm/estimate, ...; backward kernels count under the
range the main thread was in when autograd launched them, marked [bwd]) and by the aten op that
launched each kernel, with copies attributed to the op that asked for them (autocast casts,
memory-format conversions); last, each kernel by the innermost ops that launched it (which op's
bias add, say, a generic elementwise kernel was).

    python benchmarks/trace_regions.py TRACE.json.gz STEPS
"""
from __future__ import annotations

import bisect
import collections
import gzip
import json
import sys

PREFIXES = ("ctm/", "gan/", "dsm/", "objective/", "train/")  # ctm_core's record_function labels
COPY_CHAIN = ("aten::copy_", "aten::_to_copy", "aten::to", "aten::contiguous", "aten::clone")


def main(path: str, steps: int) -> None:
    events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op":
            ops[e["tid"]].append(e)
    for lst in ops.values():
        lst.sort(key=lambda e: (e["ts"], -e["dur"]))
    starts = {tid: [e["ts"] for e in lst] for tid, lst in ops.items()}
    ranges = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith(PREFIXES)]

    def stack(tid: int, ts: float) -> list[str]:
        lst, i = ops.get(tid, []), bisect.bisect_right(starts.get(tid, []), ts)
        return [e["name"] for e in reversed(lst[max(0, i - 400):i]) if e["ts"] <= ts <= e["ts"] + e["dur"]][::-1]

    def region(tid: int, ts: float) -> str:
        inside = [e for e in ranges if e["ts"] <= ts <= e["ts"] + e["dur"]]
        own = [e for e in inside if e["tid"] == tid]
        chosen = own or inside  # autograd's thread has no ranges: the main thread's innermost one
        return min(chosen, key=lambda e: e["dur"])["name"] if chosen else "?"

    by_region, by_op, count = collections.Counter(), collections.Counter(), collections.Counter()
    by_kernel, kernel_count = collections.Counter(), collections.Counter()
    total = 0.0
    for k in kernels:
        total += k["dur"]
        launch = launches.get(k["args"].get("correlation"))
        if launch is None:
            by_op["<launch not found>"] += k["dur"]
            continue
        names = stack(launch["tid"], launch["ts"])
        backward = launch["tid"] != min(ops) and not [r for r in ranges if r["tid"] == launch["tid"]]
        where = region(launch["tid"], launch["ts"]) + (" [bwd]" if backward else "")
        by_region[where] += k["dur"]
        aten = [n for n in names if n.startswith("aten::")]
        if aten and aten[-1] == "aten::copy_":
            asked = [n for n in aten if n not in COPY_CHAIN]
            outer = next((n for n in reversed(names) if not n.startswith("aten::")), "?")
            key = "copy <- " + (asked[-1] if asked else outer)
        else:
            key = aten[0] if aten else f"{names[-1] if names else launch['name']} in {where}"  # e.g. CUDA graphs
        by_op[key] += k["dur"]
        count[key] += 1
        launched_by = (k["name"][:70], " > ".join(aten[-3:]) or "-", where)
        by_kernel[launched_by] += k["dur"]
        kernel_count[launched_by] += 1
    print(f"kernel time {total / 1e3 / steps:.1f} ms/step")
    print("\nby labelled range (ms/step):")
    for name, us in by_region.most_common(30):
        print(f"  {us / 1e3 / steps:8.1f}  {name}")
    idle, window = idle_by_host_region(kernels, ranges, min(ops))
    print(f"\nGPU idle while the host ran each labelled range, the GPU's queue empty (ms/step; the GPU's "
          f"window {window / 1e3 / steps:.1f} ms/step):")
    for name, us in idle.most_common(20):
        print(f"  {us / 1e3 / steps:8.1f}  {name}")
    print("\nwork the GPU had queued ahead of the host when each of the main thread's ranges began and ended "
          "(ms; near 0: the host bounds the step there):")
    for name, at_start, at_end in gpu_lead_by_range(kernels, launches, ranges, min(ops)):
        print(f"  {at_start:8.1f} -> {at_end:8.1f}  {name}")
    print("\nby launching aten op, copies by the op that asked for them (ms/step, kernels/step):")
    for name, us in by_op.most_common(40):
        print(f"  {us / 1e3 / steps:8.1f}  {count[name] / steps:7.0f}  {name}")
    print("\nby kernel, with the innermost aten ops that launched it and its range (ms/step, kernels/step):")
    for (kernel, chain, where), us in by_kernel.most_common(40):
        print(f"  {us / 1e3 / steps:8.1f}  {kernel_count[kernel, chain, where] / steps:7.0f}  {kernel}  <- {chain}  "
              f"in {where}")


def gpu_lead_by_range(kernels: list[dict], launches: dict, ranges: list[dict],
                      main_tid: int) -> list[tuple[str, float, float]]:
    """(range, lead at its start, lead at its end) for the main thread's ranges of 5 ms or more, in order.
    The lead at a moment is how long the GPU still had to run the kernels launched before it."""
    pairs = sorted((launches[k["args"]["correlation"]]["ts"], k["ts"] + k["dur"]) for k in kernels
                   if k["args"].get("correlation") in launches)
    launched, frontier, latest = [p[0] for p in pairs], [], 0.0
    for _, end in pairs:
        latest = max(latest, end)
        frontier.append(latest)

    def lead(ts: float) -> float:
        i = bisect.bisect_right(launched, ts) - 1
        return (frontier[i] - ts) / 1e3 if i >= 0 else 0.0

    own = sorted((r for r in ranges if r["tid"] == main_tid and r["dur"] >= 5000), key=lambda r: r["ts"])
    return [(r["name"], lead(r["ts"]), lead(r["ts"] + r["dur"])) for r in own]


def idle_by_host_region(kernels: list[dict], ranges: list[dict], main_tid: int) -> tuple[collections.Counter, float]:
    """Each gap between the GPU's kernels (merged over streams), charged to the main thread's innermost
    labelled range at the gap's middle: where the host, not the GPU, bounds the step."""
    spans = sorted((k["ts"], k["ts"] + k["dur"]) for k in kernels)
    own = [r for r in ranges if r["tid"] == main_tid]
    idle = collections.Counter()
    end = spans[0][1]
    for start, stop in spans[1:]:
        if start > end:
            mid = (start + end) / 2
            inside = [r for r in own if r["ts"] <= mid <= r["ts"] + r["dur"]]
            name = min(inside, key=lambda r: r["dur"])["name"] if inside else "(outside the labelled ranges)"
            idle[name] += start - end
        end = max(end, stop)
    return idle, spans[-1][1] - spans[0][0]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]))
