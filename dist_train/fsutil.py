"""Small filesystem helpers: atomic writes and run directories that other users cannot hijack."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dist_train.errors import LaunchError


def fsync_dir(directory: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_replace(path: Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it becomes ``path`` in one rename.

    The one way dtrain publishes a file: the caller writes the temporary path however it likes (bytes,
    ``torch.save``, h5py), then it is fsynced, given ``mode``, renamed over ``path`` and the directory is
    fsynced. A reader (or a crash) sees either the old file or the complete new one, never a torn write;
    a block that raises (or is interrupted) leaves no temporary file behind.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Publish ``data`` as ``path`` atomically (see :func:`atomic_replace`)."""
    with atomic_replace(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and refuse a directory owned by someone else or a symlink.

    Run and lock directories under shared locations (/tmp, a group scratch) must not be planted
    by another user ahead of time, or they could read our files or swap them for links.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o755)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise LaunchError(
            f"{path} is a symlink or not a directory; refusing to use it. Remove it or pick another path."
        )
    if st.st_uid != os.getuid():
        raise LaunchError(
            f"{path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); refusing to write there. "
            "Pick a directory you own (--run-dir or run.output_dir)."
        )
    return path
