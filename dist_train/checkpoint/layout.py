"""Where checkpoints live and what they are called: the directory, names, name parsing, hashing and pointer files.

Torch-free, so the launcher imports these names instead of spelling them out. Layout of a run's
checkpoints (``<run_dir>/checkpoints/``)::

    ckpt-e0003-s00001200.pt              a single-file checkpoint (file.py)
    ckpt-e0003-s00001200.pt.sha256.json  its sidecar: size + sha256, written after the data file
    ckpt-e0003-s00001200/                a sharded checkpoint (sharded.py), complete once its manifest.json is
    best.pt (+ sidecar)                  the best single-file checkpoint
    latest, best                         pointer files: the name of the newest / best complete checkpoint
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from dist_train.errors import CheckpointError
from dist_train.fsutil import atomic_write_text

# The version of the checkpoint state's layout; written into every checkpoint and export, and the most this dtrain reads.
FORMAT_VERSION = 1
CHECKPOINTS_SUBDIR = "checkpoints"
CHECKPOINT_GLOB = "ckpt-*"  # checkpoint files and sharded checkpoint directories alike
LATEST_POINTER = "latest"
BEST_POINTER = "best"
BEST_NAME = "best.pt"
SIDECAR_SUFFIX = ".sha256.json"
MANIFEST_NAME = "manifest.json"
READ_CHUNK_BYTES = 8 << 20  # hashing reads in slices, so memory stays flat whatever the file's size

_FILE_RE = re.compile(r"^ckpt-e(?P<epoch>\d+)-s(?P<step>\d+)(?:-(?P<dup>\d+))?\.pt$")
_SHARDED_RE = re.compile(r"^ckpt-e(?P<epoch>\d+)-s(?P<step>\d+)(?:-(?P<dup>\d+))?$")


def make_checkpoint_directory(directory: Path) -> None:
    """Create a checkpoint directory (and its parents); a CheckpointError saying what to do when that fails."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create checkpoint directory {directory}: {exc.strerror}. Pick a writable run.output_dir."
        ) from None


def sharded_checkpoint_name(epoch: int, step: int, duplicate: int = 0) -> str:
    """A sharded checkpoint directory's name; a second save at the same (epoch, step) gets ``-1``."""
    suffix = f"-{duplicate}" if duplicate else ""
    return f"ckpt-e{epoch:04d}-s{step:08d}{suffix}"


def checkpoint_name(epoch: int, step: int, duplicate: int = 0) -> str:
    """A single-file checkpoint's name."""
    return sharded_checkpoint_name(epoch, step, duplicate) + ".pt"


def _parse(pattern: re.Pattern[str], name: str) -> tuple[int, int, int] | None:
    match = pattern.match(name)
    if match is None:
        return None
    return int(match["epoch"]), int(match["step"]), int(match["dup"] or 0)


def parse_file_name(name: str) -> tuple[int, int, int] | None:
    """(epoch, step, duplicate) of a checkpoint file name; None for any other file."""
    return _parse(_FILE_RE, name)


def parse_sharded_name(name: str) -> tuple[int, int, int] | None:
    """(epoch, step, duplicate) of a sharded checkpoint directory name; None for any other name."""
    return _parse(_SHARDED_RE, name)


def _entries_newest_first(
    directory: Path, parse: Callable[[str], tuple[int, int, int] | None], *, dirs: bool
) -> list[Path]:
    if not Path(directory).is_dir():
        return []
    found = []
    for path in Path(directory).iterdir():
        parsed = parse(path.name)
        if parsed is not None and (path.is_dir() if dirs else path.is_file()):
            found.append((parsed, path))
    return [path for _, path in sorted(found, reverse=True)]


def checkpoint_files(directory: Path) -> list[Path]:
    """Single-file checkpoints of ``directory``, newest (epoch, step, duplicate) first; temp files and best.pt excluded."""
    return _entries_newest_first(directory, parse_file_name, dirs=False)


def sharded_checkpoint_dirs(directory: Path) -> list[Path]:
    """Sharded checkpoint directories of ``directory``, newest first; temporary directories excluded."""
    return _entries_newest_first(directory, parse_sharded_name, dirs=True)


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def hash_file(path: Path) -> tuple[int, str]:
    """(size, sha256 hex digest) of the bytes of ``path``."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def read_pointer(directory: Path, pointer: str) -> str | None:
    """The checkpoint name pointer file ``pointer`` (``latest``, ``best``) holds; None when absent or unreadable."""
    try:
        value = (Path(directory) / pointer).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value or None


def write_pointer(directory: Path, pointer: str, name: str) -> None:
    """Point ``pointer`` at checkpoint ``name`` in one rename: a reader sees the old name or the new one."""
    atomic_write_text(Path(directory) / pointer, name + "\n")
