"""The README's promises stay true: the example runs, and .ci/run finds the test command."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    text = README.read_text()
    section = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```\n<!-- /{marker} -->", text, re.S)
    assert section, f"README.md lacks the {marker} block"
    return section.group(1)


def test_readme_example_runs_and_is_short(tmp_path):
    code = _block("example")
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    mean_abs = float(re.search(r"\|x_1\| = ([0-9.]+)", proc.stdout).group(1))
    assert abs(mean_abs - 1.0) < 0.05  # the closed-form teacher reproduces the mixture's modes at +-1


def test_readme_has_exactly_the_two_commands():
    run, test = _block("run-command").strip(), _block("test-command").strip()
    assert run.endswith("python sweeps/launch.py ablation_gan")
    assert "pytest" in test and len(run.splitlines()) == 1 and len(test.splitlines()) == 1
