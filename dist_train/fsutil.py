"""Small filesystem helpers: atomic writes and run directories that other users cannot hijack."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, rename over ``path``, fsync the directory.

    A reader (or a crash) sees either the old file or the complete new one, never a torn write.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
    import stat

    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        from dist_train.errors import LaunchError

        raise LaunchError(f"{path} is a symlink or not a directory; refusing to use it. Remove it or pick another path.")
    if st.st_uid != os.getuid():
        from dist_train.errors import LaunchError

        raise LaunchError(
            f"{path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); refusing to write there. "
            "Pick a directory you own (--run-dir or run.output_dir)."
        )
    return path
