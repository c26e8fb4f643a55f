"""Run directories: ``<output_dir>/<name>/<timestamp>``, found again for automatic resume."""

from __future__ import annotations

import datetime
import fcntl
import os
from pathlib import Path

from dist_train.errors import LaunchError
from dist_train.fsutil import make_private_dir

COMPLETED_MARKER = "completed"  # written by the worker when all epochs are done
PREEMPTED_MARKER = "preempted"  # written by the worker after a preemption checkpoint is durable
LOCK_FILE = "launcher/run.lock"  # flock'ed by the launcher that is running the job


def new_run_dir(output_dir: str, name: str, *, now: datetime.datetime | None = None) -> Path:
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir).expanduser() / name
    candidate = base / stamp
    n = 1
    while candidate.exists():  # two launches in the same second get different directories
        n += 1
        candidate = base / f"{stamp}-{n}"
    return candidate


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "latest").is_file()


def newest_resumable_run(output_dir: str, name: str) -> Path | None:
    """The newest run of this config name that has a checkpoint and did not finish."""
    base = Path(output_dir).expanduser() / name
    if not base.is_dir():
        return None
    runs = [p for p in base.iterdir() if p.is_dir() and not p.is_symlink() and p.stat().st_uid == os.getuid()]
    for run in sorted(runs, key=lambda p: p.name, reverse=True):
        if has_checkpoint(run) and not (run / COMPLETED_MARKER).exists() and not is_in_use(run):
            return run
    return None


def _open_lock(run_dir: Path) -> int:
    return os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def is_in_use(run_dir: Path) -> bool:
    """True while another launcher runs a job in ``run_dir`` (it holds the run lock)."""
    if not (run_dir / LOCK_FILE).is_file():
        return False
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def lock_run_dir(run_dir: Path) -> int:
    """Hold the run lock for the job's lifetime (the kernel drops it when the launcher dies).

    Two launches writing one run directory would interleave checkpoints and metrics; the second
    one is refused here, and automatic resume skips runs that are in use.
    """
    fd = _open_lock(run_dir)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LaunchError(
            f"the run directory {run_dir} is in use by another running dtrain launch. Wait for it to finish, "
            "stop it, or start a separate run with --resume never (or another --run-dir)."
        ) from None
    return fd


def prepare_run_dir(path: Path, *, lock: bool = True) -> tuple[Path, int | None]:
    """Create the run directory (ours, not a symlink), lock it, clear the previous attempt's markers.

    Returns the directory and the run lock's descriptor (keep it open while the job runs; None
    without ``lock``: the other nodes of a multi-node job share the directory of node 0).
    """
    run_dir = make_private_dir(path.absolute())
    for sub in ("logs", "launcher"):
        (run_dir / sub).mkdir(exist_ok=True)
    lock_fd = lock_run_dir(run_dir) if lock else None
    for marker in (PREEMPTED_MARKER, COMPLETED_MARKER):
        (run_dir / marker).unlink(missing_ok=True)
    return run_dir, lock_fd
