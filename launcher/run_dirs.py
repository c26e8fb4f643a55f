"""Run directories: ``<output_dir>/<name>/<timestamp>``, found again for automatic resume.

``--debug`` runs (a few batches per epoch) are kept apart from normal runs: their directories are
``<timestamp>-debug`` and hold a ``debug`` marker, written before the worker starts and never removed.
Automatic resume only continues a run of the same kind, and naming a run of the other kind
(``--run-dir``, ``--resume PATH``) is refused, so a normal run never mixes with a debug run's
truncated epochs, and a debug run never writes into a real run's directory.
"""

from __future__ import annotations

import datetime
import fcntl
import os
from pathlib import Path

from dist_train.checkpoint.layout import CHECKPOINTS_SUBDIR, LATEST_POINTER
from dist_train.envvars import STOP_SIGNAL_FILE
from dist_train.errors import ConfigError, LaunchError
from dist_train.fsutil import make_private_dir

COMPLETED_MARKER = "completed"  # written by the worker when all epochs are done
PREEMPTED_MARKER = "preempted"  # written by the worker after a preemption checkpoint is durable
DEBUG_MARKER = "debug"  # written by the launcher into the directory of a --debug run; never removed
LOCK_FILE = "launcher/run.lock"  # flock'ed by the launcher that is running the job
_DEBUG_MARKER_TEXT = (
    "This run was started by `dtrain launch --debug` (one process, a few batches per epoch).\n"
    "Only --debug launches continue it; a normal launch starts a run of its own.\n"
)


def new_run_dir(output_dir: str, name: str, *, debug: bool = False, now: datetime.datetime | None = None) -> Path:
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S") + ("-debug" if debug else "")
    base = Path(output_dir).expanduser() / name
    candidate = base / stamp
    n = 1
    while candidate.exists():  # two launches in the same second get different directories
        n += 1
        candidate = base / f"{stamp}-{n}"
    return candidate


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINTS_SUBDIR / LATEST_POINTER).is_file()


def is_debug_run(run_dir: Path) -> bool:
    return (run_dir / DEBUG_MARKER).is_file()


def holds_a_run(run_dir: Path) -> bool:
    """A launch already used this directory (an empty directory made by hand does not count)."""
    return (run_dir / "config.toml").exists() or (run_dir / CHECKPOINTS_SUBDIR).is_dir()


def _runs_newest_first(output_dir: str, name: str, *, debug: bool) -> list[Path]:
    """This user's run directories of this config name and kind (``--debug`` or not), newest first."""
    base = Path(output_dir).expanduser() / name
    if not base.is_dir():
        return []
    runs = [p for p in base.iterdir() if p.is_dir() and not p.is_symlink() and p.stat().st_uid == os.getuid()]
    return [run for run in sorted(runs, key=lambda p: p.name, reverse=True) if is_debug_run(run) == debug]


def newest_resumable_run(output_dir: str, name: str, *, debug: bool = False) -> Path | None:
    """The newest run of this config name and kind (``--debug`` or not) that has a checkpoint and did not finish."""
    for run in _runs_newest_first(output_dir, name, debug=debug):
        if has_checkpoint(run) and not is_complete(run) and not is_in_use(run):
            return run
    return None


def is_complete(run_dir: Path) -> bool:
    return (run_dir / COMPLETED_MARKER).exists()


def newest_run_if_complete(output_dir: str, name: str, *, debug: bool = False) -> Path | None:
    """The newest run of this config name and kind with a checkpoint, if it finished all its epochs."""
    for run in _runs_newest_first(output_dir, name, debug=debug):
        if has_checkpoint(run):
            return run if is_complete(run) else None
    return None


def check_run_kind(run_dir: Path, *, debug: bool) -> None:
    """Refuse to continue (or write into) a run of the other kind named by ``--run-dir``."""
    if not holds_a_run(run_dir) or is_debug_run(run_dir) == debug:
        return
    if is_debug_run(run_dir):
        raise ConfigError(
            f"--run-dir {run_dir} holds a --debug run (a few batches per epoch); a normal launch does not "
            "continue it. Leave out --run-dir to start (or resume) a normal run of this config, or pick a new "
            "--run-dir; add --debug to continue the debug run."
        )
    raise ConfigError(
        f"--run-dir {run_dir} holds a normal (non-debug) run; --debug does not write into it, its few-batch "
        "epochs would mix with the run's own. Leave out --run-dir (debug runs get their own <time>-debug "
        "directory) or pick a new one; to debug from this run's state use --debug --resume "
        f"{run_dir / CHECKPOINTS_SUBDIR}/<checkpoint>.pt."
    )


def checkpoint_run_dir(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint file belongs to (``<run>/checkpoints/ckpt-*.pt``), if it sits in one."""
    parent = checkpoint.absolute().parent
    return parent.parent if parent.name == CHECKPOINTS_SUBDIR else None


def check_resume_source(checkpoint: Path, *, debug: bool) -> None:
    """A normal launch does not start from a --debug run's checkpoint (its epochs were cut short).

    The reverse is allowed: ``--debug --resume PATH`` of a real run's checkpoint runs in a new debug
    directory, leaves that run untouched, and is how one debugs the state a real run reached.
    """
    run = checkpoint_run_dir(checkpoint)
    if debug or run is None or not is_debug_run(run):
        return
    raise ConfigError(
        f"--resume {checkpoint}: that checkpoint was written by a --debug run ({run}: a few batches per epoch, "
        "anomaly detection); a normal launch does not continue a debug run. Start the normal run fresh "
        "(leave out --resume, or --resume never), or add --debug to continue the debug run."
    )


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


def prepare_run_dir(path: Path, *, lock: bool = True, debug: bool = False) -> tuple[Path, int | None]:
    """Create the run directory (ours, not a symlink), lock it, clear the previous attempt's markers.

    A ``debug`` run is marked as one before its worker can write a checkpoint. Returns the directory
    and the run lock's descriptor (keep it open while the job runs; None without ``lock``: the other
    nodes of a multi-node job share the directory of node 0).
    """
    run_dir = make_private_dir(path.absolute())
    for sub in ("logs", "launcher"):
        (run_dir / sub).mkdir(exist_ok=True)
    lock_fd = lock_run_dir(run_dir) if lock else None
    for marker in (PREEMPTED_MARKER, COMPLETED_MARKER, STOP_SIGNAL_FILE):
        (run_dir / marker).unlink(missing_ok=True)
    if debug:
        _write_debug_marker(run_dir)
    return run_dir, lock_fd


def _write_debug_marker(run_dir: Path) -> None:
    fd = os.open(run_dir / DEBUG_MARKER, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(_DEBUG_MARKER_TEXT)
