"""A real single-node SLURM cluster on localhost, for tests and for trying job scripts by hand.

Why: mocks of sbatch/squeue drift from what SLURM really does (arrays, requeue, GRES, srun
task layout). This module brings up the real daemons -- munged, slurmctld and slurmd -- with
every file (config, keys, sockets, pid files, logs, spool) inside one state directory, so it
neither needs nor touches a system-wide SLURM or munge setup and two clusters can coexist.

Command line (stdout carries only shell `export` lines, so `eval "$(... start)"` works):

    python -m cluster.testing.slurm_cluster install
    python -m cluster.testing.slurm_cluster start  [--dir D] [--gpus 4]
    python -m cluster.testing.slurm_cluster status [--dir D]      # exit 0 running, 1 stopped
    python -m cluster.testing.slurm_cluster env    [--dir D]
    python -m cluster.testing.slurm_cluster stop   [--dir D]

Python:

    with SlurmCluster("/tmp/my-slurm", gpus=4) as cluster:
        subprocess.run(["sbatch", ...], env={**os.environ, **cluster.env})

GPUs are fake: gres.conf points at empty files, so `--gpus-per-node` schedules and counts but
CUDA_VISIBLE_DEVICES inside jobs names no real device. Daemons are stopped by the PIDs in their
pid files, never by process name.

Known limits: there is no slurmdbd, so `sacct` fails and submitit logs "Bypassing sacct error";
submitit then learns that a job ended only from its result file, so a job killed before writing one
leaves `job.result()` waiting -- poll `job.done()` with a deadline in tests. A requeued batch job
may restart only after cred_expire + 1 s (11 s here, 121 s in stock SLURM).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

DEFAULT_STATE_DIR = Path(os.environ.get("CTM_LAB_SLURM_DIR", "/tmp/ctm-lab-slurm"))
PARTITION = "debug"
NODE_NAME = "localhost"  # slurmd must find its own name in slurm.conf; localhost always resolves
APT_PACKAGES = ("slurm-wlm", "munge")
REQUIRED_BINARIES = {
    "slurmctld": "slurm-wlm",
    "slurmd": "slurm-wlm",
    "sinfo": "slurm-wlm",
    "sbatch": "slurm-wlm",
    "squeue": "slurm-wlm",
    "scontrol": "slurm-wlm",
    "scancel": "slurm-wlm",
    "srun": "slurm-wlm",
    "munged": "munge",
    "munge": "munge",
    "unmunge": "munge",
}
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
_READY_STATES = {"idle"}
_BROKEN_STATES = {"drain", "drng", "down", "fail", "failg"}


class SlurmSetupError(RuntimeError):
    """SLURM or munge is missing, or the cluster did not come up; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Installation


def _which(name: str) -> Optional[str]:
    """Like shutil.which, but also looks in sbin (not on PATH for non-root shells)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS])
    return shutil.which(name, path=search)


def missing_binaries() -> list[str]:
    return [name for name in REQUIRED_BINARIES if _which(name) is None]


def _apt_lists_know_packages() -> bool:
    """True when apt's package lists already hold candidates for our packages (no update needed)."""
    try:
        out = subprocess.run(
            ["apt-cache", "policy", *APT_PACKAGES], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    candidates = [line.split(":", 1)[1].strip() for line in out.splitlines() if "Candidate:" in line]
    return len(candidates) == len(APT_PACKAGES) and all(c and c != "(none)" for c in candidates)


def ensure_installed(allow_install: bool = True) -> None:
    """Make sure the SLURM and munge binaries exist, installing them with apt when we are root."""
    missing = missing_binaries()
    if not missing:
        return
    how = f"apt-get install -y {' '.join(APT_PACKAGES)}  (Debian/Ubuntu; as root)"
    if not allow_install or os.geteuid() != 0 or _which("apt-get") is None:
        raise SlurmSetupError(
            f"SLURM/munge binaries missing: {', '.join(missing)}. Install them with: {how}"
        )
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait_for_lock = ["-o", "DPkg::Lock::Timeout=600"]  # other agents/CI steps may hold dpkg's lock
    steps = []
    if not _apt_lists_know_packages():
        steps.append(["apt-get", *wait_for_lock, "update"])
    steps.append(["apt-get", *wait_for_lock, "install", "-y", *APT_PACKAGES])
    for cmd in steps:
        proc = subprocess.run(cmd, env=apt_env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SlurmSetupError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{_tail_text(proc.stdout + proc.stderr)}"
            )
    still_missing = missing_binaries()
    if still_missing:
        raise SlurmSetupError(f"after installing {APT_PACKAGES}, still missing: {', '.join(still_missing)}")


# --------------------------------------------------------------------------------------------
# Small helpers


def _tail_text(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _tail_file(path: Path, lines: int = 25) -> str:
    try:
        return _tail_text(path.read_text(errors="replace"), lines)
    except OSError:
        return "(missing)"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _real_memory_mib() -> int:
    """MemTotal minus ~2 GiB head-room, so slurmd never reports less memory than configured."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                total_mib = int(line.split()[1]) // 1024
                return max(256, total_mib - 2048)
    raise SlurmSetupError("cannot read MemTotal from /proc/meminfo")


def _read_pid(pid_file: Path) -> Optional[int]:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _pid_is(pid: Optional[int], program: str) -> bool:
    """True when `pid` is a live (non-zombie) process running `program` -- guards against PID reuse."""
    if pid is None or pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X") and comm == program[:15]


def _kill_pid(pid: int, program: str, timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL -- only if the PID still belongs to `program`."""
    if not _pid_is(pid, program):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_is(pid, program):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------------------------
# The cluster


class SlurmCluster:
    """One slurmctld + one slurmd (+ its own munged) on localhost, all state under `state_dir`.

    `start()` is a no-op when the cluster in `state_dir` already runs; `stop()` is a no-op when it
    does not. As a context manager it stops on exit only what its own `start()` brought up.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike = DEFAULT_STATE_DIR,
        gpus: int = 4,
        *,
        cpus: Optional[int] = None,
        partition: str = PARTITION,
        munge_socket: Optional[str] = None,
        start_timeout: float = 60.0,
        cred_expire_s: int = 10,
        install: bool = True,
    ):
        if not isinstance(gpus, int) or gpus < 0:
            raise ValueError(f"gpus must be a non-negative int, got {gpus!r}")
        if cpus is not None and (not isinstance(cpus, int) or cpus < 1):
            raise ValueError(f"cpus must be a positive int, got {cpus!r}")
        if start_timeout <= 0:
            raise ValueError(f"start_timeout must be positive, got {start_timeout!r}")
        if not isinstance(cred_expire_s, int) or cred_expire_s < 5:
            raise ValueError(f"cred_expire_s must be an int >= 5, got {cred_expire_s!r}")
        self.state_dir = Path(state_dir).absolute()
        self.gpus = gpus
        self.cpus = cpus or os.cpu_count() or 1
        self.partition = partition
        self.external_munge_socket = munge_socket  # reuse a running munged instead of our own
        self.start_timeout = start_timeout
        # SLURM holds a requeued batch job for cred_expire + 1 s (default 120 s); 10 s keeps
        # requeue tests quick while still leaving step launches plenty of time on a busy host.
        self.cred_expire_s = cred_expire_s
        self.install = install
        self._started_here = False

    # ---- paths -------------------------------------------------------------------------------
    @property
    def conf_path(self) -> Path:
        return self.state_dir / "slurm.conf"

    @property
    def _munge_dir(self) -> Path:
        return self.state_dir / "munge"

    @property
    def _log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def _record_path(self) -> Path:
        return self.state_dir / "cluster.json"

    def _pid_files(self) -> dict[str, Path]:
        return {
            "munged": self._munge_dir / "munged.pid",
            "slurmctld": self.state_dir / "slurmctld.pid",
            "slurmd": self.state_dir / "slurmd.pid",
        }

    @property
    def env(self) -> dict[str, str]:
        """Variables to add to a subprocess's environment so sbatch/squeue/srun find this cluster."""
        return {"SLURM_CONF": str(self.conf_path)}

    # ---- state record ------------------------------------------------------------------------
    def _read_record(self) -> dict:
        try:
            return json.loads(self._record_path.read_text())
        except (OSError, ValueError):
            return {}

    def _write_record(self, record: dict) -> None:
        self._record_path.write_text(json.dumps(record, indent=2) + "\n")

    def pids(self) -> dict[str, Optional[int]]:
        """Live daemon PIDs from our pid files (None where not running); munged only if ours."""
        record = self._read_record()
        live = {}
        for program, pid_file in self._pid_files().items():
            if program == "munged" and not record.get("own_munged", False):
                continue
            pid = _read_pid(pid_file)
            live[program] = pid if _pid_is(pid, program) else None
        return live

    def _client_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def _sinfo_nodes(self) -> Optional[str]:
        """`sinfo` node line ("localhost idle gpu:4"), or None when slurmctld does not answer."""
        try:
            proc = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %t %G"],
                env=self._client_env(), capture_output=True, text=True, timeout=15,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    def is_running(self) -> bool:
        if not self.conf_path.exists():
            return False
        pids = self.pids()
        return bool(pids) and all(pid is not None for pid in pids.values()) and self._sinfo_nodes() is not None

    # ---- start -------------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        if self.is_running():
            running_gpus = self._read_record().get("gpus")
            if running_gpus != self.gpus:
                warnings.warn(
                    f"SLURM test cluster in {self.state_dir} already runs with gpus={running_gpus}; "
                    f"gpus={self.gpus} ignored (stop it first to change the node)",
                    stacklevel=2,
                )
            return self
        if any(pid is not None for pid in self.pids().values()):
            self.stop()  # half-up leftovers from a crash: start from scratch
        ensure_installed(allow_install=self.install)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("ctld", "spool", "log", "fake_gpus"):
            (self.state_dir / sub).mkdir(exist_ok=True)
        try:
            # Record first, so a failed start still knows which munged is ours to stop.
            own_munged = not self.external_munge_socket
            self._write_record({"own_munged": own_munged, "gpus": self.gpus})
            munge_socket = self._start_munge()
            self._write_record({"own_munged": own_munged, "munge_socket": munge_socket, "gpus": self.gpus})
            self._write_config(munge_socket)
            daemon_env = self._client_env()
            self._launch(["slurmctld", "-c", "-f", str(self.conf_path)], "slurmctld", daemon_env)
            self._launch(["slurmd", "-f", str(self.conf_path), "-N", NODE_NAME], "slurmd", daemon_env)
            self._wait_until_idle()
        except BaseException:
            self.stop()
            raise
        self._started_here = True
        return self

    def _start_munge(self) -> str:
        """Start our own munged on a private socket (or check the external one); return the socket."""
        if self.external_munge_socket:
            self._check_munge(self.external_munge_socket)
            return self.external_munge_socket
        munge_dir = self._munge_dir
        munge_dir.mkdir(mode=0o755, exist_ok=True)
        munge_dir.chmod(0o755)  # munged wants the socket's directory searchable by everyone
        key_dir = munge_dir / "key"
        key_dir.mkdir(mode=0o700, exist_ok=True)
        key = key_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = munge_dir / "munge.socket"
        if len(str(sock)) > 100:  # AF_UNIX paths are limited to 108 bytes
            raise ValueError(f"state_dir is too long for a munge socket path ({sock}); use a shorter state_dir")
        self._launch(
            [
                "munged", "--force",
                f"--socket={sock}", f"--key-file={key}",
                f"--pid-file={self._pid_files()['munged']}",
                f"--log-file={self._log_dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
            "munged",
            dict(os.environ),
        )
        self._check_munge(str(sock))
        return str(sock)

    def _check_munge(self, sock: str) -> None:
        encode = subprocess.run(["munge", "-n", "-S", sock], capture_output=True, timeout=15)
        decode = subprocess.run(["unmunge", "-S", sock], input=encode.stdout, capture_output=True, timeout=15)
        if encode.returncode != 0 or decode.returncode != 0:
            raise SlurmSetupError(
                f"munge round trip on socket {sock} failed:\n{encode.stderr.decode()}{decode.stderr.decode()}\n"
                f"munged.log:\n{_tail_file(self._log_dir / 'munged.log')}"
            )

    def _write_config(self, munge_socket: str) -> None:
        d = self.state_dir
        user = pwd.getpwuid(os.geteuid()).pw_name
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        lines = [
            "# Written by cluster.testing.slurm_cluster -- a throwaway single-node test cluster.",
            "ClusterName=ctmlab",
            f"SlurmctldHost={NODE_NAME}",
            f"SlurmctldPort={_free_port()}",  # free ports: coexists with other clusters on this host
            f"SlurmdPort={_free_port()}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket},cred_expire={self.cred_expire_s}",
            f"StateSaveLocation={d / 'ctld'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={self._pid_files()['slurmctld']}",
            f"SlurmdPidFile={self._pid_files()['slurmd']}",
            f"SlurmctldLogFile={self._log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self._log_dir / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",  # no cgroups needed
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "GresTypes=gpu",
            "ReturnToService=2",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",  # no slurmdbd: sacct does not work
            "JobCompType=jobcomp/none",
            "SwitchType=switch/none",
            "KillWait=5",  # seconds between SIGTERM and SIGKILL on cancel/requeue; keeps tests quick
            "InactiveLimit=0",
            "MailProg=/bin/true",  # no MTA here; silences "Configured MailProg is invalid"
            "MinJobAge=300",
            # Poll pending jobs every second (defaults 60/30 s): a requeued job whose begin time
            # passes triggers no event, so it would otherwise wait up to half a minute.
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            f"NodeName={NODE_NAME} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={_real_memory_mib()}{gres} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={NODE_NAME} Default=YES MaxTime=INFINITE "
            "State=UP OverSubscribe=FORCE:4",
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")
        gres_lines = ["AutoDetect=off"]
        if self.gpus:
            # Without File= the node goes INVAL ("gres/gpu count reported lower than configured").
            for i in range(self.gpus):
                (d / "fake_gpus" / f"gpu{i}").touch()
            last = self.gpus - 1
            gpu_files = f"{d / 'fake_gpus'}/gpu[0-{last}]" if last else f"{d / 'fake_gpus'}/gpu0"
            gres_lines.append(f"NodeName={NODE_NAME} Name=gpu File={gpu_files}")
        (d / "gres.conf").write_text("\n".join(gres_lines) + "\n")

    def _launch(self, cmd: list[str], program: str, env: dict[str, str]) -> None:
        """Run a self-daemonizing program and wait for its pid file to name a live process."""
        pid_file = self._pid_files()[program]
        pid_file.unlink(missing_ok=True)
        out_path = self._log_dir / f"{program}.stdout"
        exe = _which(cmd[0])
        if exe is None:
            raise SlurmSetupError(f"{cmd[0]} not found; install with: apt-get install -y {REQUIRED_BINARIES[cmd[0]]}")
        with open(out_path, "ab") as out:
            proc = subprocess.run(
                [exe, *cmd[1:]], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, timeout=60,
            )
        if proc.returncode != 0:
            raise SlurmSetupError(self._failure_report(f"`{' '.join(cmd)}` exited with {proc.returncode}"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if _pid_is(_read_pid(pid_file), program):
                return
            time.sleep(0.1)
        raise SlurmSetupError(self._failure_report(f"{program} did not write a live pid to {pid_file}"))

    def _wait_until_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        resumed = False
        last = None
        while time.monotonic() < deadline:
            last = self._sinfo_nodes()
            state = last.split()[1].rstrip("*~#$@^-!%") if last and len(last.split()) > 1 else None
            if state in _READY_STATES:
                return
            if state == "inval":  # config disagrees with the hardware slurmd found: resume won't help
                raise SlurmSetupError(self._failure_report(f"node is INVAL (sinfo: {last!r})"))
            if state in _BROKEN_STATES and not resumed:
                # A stale registration from an earlier config can leave the node down; resume once.
                subprocess.run(
                    ["scontrol", "update", f"nodename={NODE_NAME}", "state=resume"],
                    env=self._client_env(), capture_output=True, timeout=15,
                )
                resumed = True
            for program, pid in self.pids().items():
                if pid is None:
                    raise SlurmSetupError(self._failure_report(f"{program} died during start-up"))
            time.sleep(0.25)
        raise SlurmSetupError(
            self._failure_report(f"node not idle after {self.start_timeout:.0f} s (last sinfo: {last!r})")
        )

    def _failure_report(self, headline: str) -> str:
        parts = [f"SLURM test cluster in {self.state_dir}: {headline}"]
        for name in ("slurmctld.log", "slurmd.log", "munged.log", "slurmctld.stdout", "slurmd.stdout", "munged.stdout"):
            path = self._log_dir / name
            if path.exists():
                parts.append(f"--- tail of {path} ---\n{_tail_file(path)}")
        return "\n".join(parts)

    # ---- stop --------------------------------------------------------------------------------
    def cancel_all_jobs(self, timeout: float = 15.0) -> None:
        """scancel every job this cluster knows, so no slurmstepd outlives the daemons."""
        if _pid_is(_read_pid(self._pid_files()["slurmctld"]), "slurmctld"):
            try:
                out = subprocess.run(
                    ["squeue", "-h", "-o", "%A"], env=self._client_env(),
                    capture_output=True, text=True, timeout=15,
                ).stdout.split()
                if out:
                    subprocess.run(["scancel", *out], env=self._client_env(), capture_output=True, timeout=15)
                deadline = time.monotonic() + timeout
                while out and time.monotonic() < deadline:
                    out = subprocess.run(
                        ["squeue", "-h", "-o", "%A"], env=self._client_env(),
                        capture_output=True, text=True, timeout=15,
                    ).stdout.split()
                    time.sleep(0.25)
            except (OSError, subprocess.TimeoutExpired):
                pass

    def stop(self) -> None:
        if not self.state_dir.exists():
            return
        self.cancel_all_jobs()
        record = self._read_record()
        pid_files = self._pid_files()
        for program in ("slurmd", "slurmctld"):
            pid = _read_pid(pid_files[program])
            if pid is not None:
                _kill_pid(pid, program)
            pid_files[program].unlink(missing_ok=True)
        if record.get("own_munged", False):
            pid = _read_pid(pid_files["munged"])
            if pid is not None:
                _kill_pid(pid, "munged")
            pid_files["munged"].unlink(missing_ok=True)
        self._started_here = False

    # ---- context manager -----------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._started_here:
            self.stop()

    def status_text(self) -> str:
        pids = self.pids()
        running = self.is_running()
        lines = [f"state dir: {self.state_dir}", f"status: {'running' if running else 'stopped'}"]
        lines += [f"{program}: {pid if pid is not None else '-'}" for program, pid in pids.items()]
        if running:
            lines.append(f"sinfo: {self._sinfo_nodes()}")
        return "\n".join(lines)


def export_lines(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}={v}" for k, v in env.items())


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.testing.slurm_cluster", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "stop", "status", "env"):
        p = sub.add_parser(name)
        p.add_argument("--dir", type=Path, default=DEFAULT_STATE_DIR, help=f"state directory [{DEFAULT_STATE_DIR}]")
        if name == "start":
            p.add_argument("--gpus", type=int, default=None, help="fake GPUs on the node [4, or as last started in --dir]")
            p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an idle node [60]")
    sub.add_parser("install", help="apt-get install slurm-wlm munge if missing (root)")
    args = parser.parse_args(argv)

    try:
        if args.command == "install":
            ensure_installed()
            print("slurm-wlm and munge are installed", file=sys.stderr)
            return 0
        gpus = getattr(args, "gpus", None)
        if gpus is None:  # keep what a running cluster has, so a plain `start` stays a quiet no-op
            gpus = SlurmCluster(args.dir)._read_record().get("gpus", 4)
        cluster = SlurmCluster(args.dir, gpus=gpus, start_timeout=getattr(args, "timeout", 60.0))
        if args.command == "start":
            was_running = cluster.is_running()
            t0 = time.monotonic()
            cluster.start()
            note = "already running" if was_running else f"started in {time.monotonic() - t0:.1f} s"
            print(f"SLURM test cluster {note}: {cluster.state_dir} (partition {cluster.partition})", file=sys.stderr)
            print(export_lines(cluster.env))
        elif args.command == "stop":
            cluster.stop()
            print(f"SLURM test cluster stopped: {cluster.state_dir}", file=sys.stderr)
        elif args.command == "status":
            print(cluster.status_text())
            return 0 if cluster.is_running() else 1
        elif args.command == "env":
            print(export_lines(cluster.env))
    except SlurmSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
