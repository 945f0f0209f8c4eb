"""How the launcher starts the sweep's teacher process: fork where that is safe, spawn otherwise."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import threading, time
from sweeps.trial import _start_method
alone, two_threads = _start_method(1), _start_method(2)
threading.Thread(target=time.sleep, args=(2,), daemon=True).start()
print(alone, two_threads, _start_method(1))
"""


def test_fork_only_for_a_one_thread_teacher_from_a_one_thread_launcher():
    """A forked child inherits other threads' locks held, and GNU OpenMP hangs in a forked child that
    opens a parallel region after its parent did: the teacher is forked only from a launcher with no
    other Python thread, only to train on one thread, and never where there is a GPU."""
    import torch

    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    alone, two_threads, with_thread = out.stdout.split()
    assert alone == ("spawn" if torch.cuda.is_available() else "fork")
    assert two_threads == "spawn" and with_thread == "spawn"
