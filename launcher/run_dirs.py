"""Run directories: ``<output_dir>/<name>/<timestamp>``, found again for automatic resume."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from dist_train.fsutil import make_private_dir

COMPLETED_MARKER = "completed"  # written by the worker when all epochs are done
PREEMPTED_MARKER = "preempted"  # written by the worker after a preemption checkpoint is durable


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
        if has_checkpoint(run) and not (run / COMPLETED_MARKER).exists():
            return run
    return None


def prepare_run_dir(path: Path) -> Path:
    """Create the run directory (ours, not a symlink) and clear the previous attempt's markers."""
    run_dir = make_private_dir(path.absolute())
    for marker in (PREEMPTED_MARKER, COMPLETED_MARKER):
        (run_dir / marker).unlink(missing_ok=True)
    for sub in ("logs", "launcher"):
        (run_dir / sub).mkdir(exist_ok=True)
    return run_dir
