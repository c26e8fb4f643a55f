"""Torch-free HDF5 access: safe opening, storage inspection and batched row reads.

Reads go through :class:`RowReader`, which picks the fastest correct path for a dataset:

* contiguous and uncompressed: an ``np.memmap`` at ``dset.id.get_offset()``; a batch is one
  ``np.take`` gather straight into the output buffer (no HDF5 call at all per batch);
* chunked (compressed or not): the touched chunks are read once each through h5py as a row
  range and the wanted rows are scattered into the output, so no chunk is decompressed twice
  per batch (h5py fancy indexing would do one selection per sample);
* anything else (contiguous but not mappable, e.g. an unwritten dataset): one h5py read of the
  sorted unique rows.

Handles are opened lazily and re-opened after a fork, so a reader can be pickled to spawn or
forkserver workers and copied into forked ones. Files are opened read-only without HDF5 file
locking, so several jobs can read one file (locking also fails on many network filesystems).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_train.errors import DataError

# HDF5 reads this when a file is opened; `locking=False` below covers h5py builds that support
# it, the variable covers the rest and any HDF5 opened by other libraries in the process.
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")

import h5py  # noqa: E402  (the environment variable must be set first)

# Bumped in every forked child: a reader opened before the fork must open its own handle. A
# counter instead of os.getpid() per read, which is a system call (microseconds in some VMs).
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)

# Rows read per h5py call when a contiguous dataset cannot be memory-mapped.
_FALLBACK_BLOCK_BYTES = 8 << 20


def open_h5(path: Path | str) -> h5py.File:
    """Open an HDF5 file read-only, without file locking; problems become a :class:`DataError`."""
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"data file {str(p)!r} does not exist. Check data.path (relative paths are relative to the "
            "working directory), or create demo data with `dtrain data synth OUT.h5`."
        )
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} is not a regular file; data.path must name an HDF5 file.")
    try:
        try:
            return h5py.File(p, "r", locking=False)
        except OSError as exc:
            if "locking flag" not in str(exc):
                raise
            # This process already has the file open with HDF5's default locking (user code,
            # or h5py imported before the variable above was set); HDF5 requires equal flags.
            return h5py.File(p, "r")
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{str(p)!r} cannot be opened as an HDF5 file (it is not HDF5, or it is truncated or corrupt): {exc}. "
            "Check the file, re-copy it, or convert it with `dtrain data convert`."
        ) from None


def list_datasets(f: h5py.Group) -> dict[str, h5py.Dataset]:
    """All datasets in the file, by path relative to the root (``group/name``)."""
    found: dict[str, h5py.Dataset] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found[name] = obj

    f.visititems(visit)
    return found


def describe_keys(f: h5py.Group) -> str:
    items = [f"{name} {tuple(d.shape)} {d.dtype}" for name, d in list_datasets(f).items()]
    return ", ".join(items) if items else "(no datasets)"


def get_dataset(f: h5py.File, key: str, path: Path | str, role: str) -> h5py.Dataset:
    """The dataset ``key`` or a DataError listing the datasets that do exist."""
    obj = f.get(key)
    if not isinstance(obj, h5py.Dataset):
        what = "is a group, not a dataset" if obj is not None else "does not exist"
        setting = role if role.startswith(("data.", "task.")) else f"data.{role}"
        raise DataError(
            f"{str(path)!r}: key {key!r} ({role}) {what}. Datasets in the file: {describe_keys(f)}. "
            f"Set {setting} to one of them."
        )
    return obj


@dataclass(frozen=True)
class Storage:
    """How a dataset is stored and whether the memmap fast path applies."""

    layout: str  # "contiguous" | "chunked" | "compact" | "virtual" | "external"
    chunks: tuple[int, ...] | None
    compression: str | None
    filters: tuple[str, ...]
    offset: int | None  # byte offset in the file when memory-mappable

    @property
    def fast_path(self) -> bool:
        return self.offset is not None


def storage_of(dset: h5py.Dataset) -> Storage:
    plist = dset.id.get_create_plist()
    layout_code = plist.get_layout()
    names = {
        h5py.h5d.CONTIGUOUS: "contiguous",
        h5py.h5d.CHUNKED: "chunked",
        h5py.h5d.COMPACT: "compact",
    }
    layout = names.get(layout_code, "virtual" if dset.is_virtual else "other")
    if layout == "contiguous" and plist.get_external_count() > 0:
        layout = "external"
    filters = tuple(_filter_name(plist.get_filter(i)) for i in range(plist.get_nfilters()))
    offset = None
    mappable = (
        layout == "contiguous"
        and not filters
        and dset.dtype.kind in "biuf"  # plain numbers: a memmap reinterprets the bytes directly
        and dset.dtype.fields is None
        and dset.file.driver in ("sec2", "stdio")  # the bytes live in the named file itself
    )
    if mappable:
        offset = dset.id.get_offset()  # None when the dataset's space was never allocated
    return Storage(layout, dset.chunks, dset.compression, filters, offset)


def _filter_name(info: tuple[Any, ...]) -> str:
    # get_filter returns (code, flags, values, name); the name is bytes such as b"deflate".
    name = info[3]
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def file_size(path: Path | str) -> int:
    return os.stat(path).st_size


class RowReader:
    """Reads sets of rows (axis 0) of one dataset; picklable, opens lazily in each process."""

    def __init__(self, path: Path | str, key: str) -> None:
        self.path = str(path)
        self.key = key
        self._generation: int | None = None
        self._file: h5py.File | None = None
        self._dset: h5py.Dataset | None = None
        self._memmap: np.memmap | None = None
        self.shape: tuple[int, ...] = ()
        self.dtype: np.dtype = np.dtype("float32")
        self._chunk_rows = 0

    # ------------------------------------------------------------------ process-local state
    def __getstate__(self) -> dict[str, Any]:
        # Only the location travels: h5py handles and maps are not valid in another process.
        return {"path": self.path, "key": self.key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["key"])  # type: ignore[misc]

    def _ensure_open(self) -> None:
        if self._generation == _fork_generation:
            return
        # A handle inherited through fork shares HDF5's state with the parent: open a fresh one.
        self._file = open_h5(self.path)
        dset = get_dataset(self._file, self.key, self.path, "key")
        self._dset = dset
        self.shape = tuple(dset.shape)
        self.dtype = dset.dtype
        storage = storage_of(dset)
        self._memmap = None
        if dset.chunks is not None:
            self._chunk_rows = dset.chunks[0]
        else:
            row_bytes = max(1, int(np.prod(dset.shape[1:], dtype=np.int64)) * dset.dtype.itemsize)
            self._chunk_rows = max(1, _FALLBACK_BLOCK_BYTES // row_bytes)
        if storage.fast_path and dset.size > 0:
            offset = int(storage.offset) if storage.offset is not None else 0  # fast_path means it is set
            self._memmap = np.memmap(self.path, dtype=dset.dtype, mode="r", offset=offset, shape=tuple(dset.shape))
            # The map needs no HDF5 handle. Keeping one open would make a user's own plain
            # h5py.File(path) in this process fail ("file locking flag values don't match").
            self._file.close()
            self._file = None
            self._dset = None
        self._generation = _fork_generation

    def close(self) -> None:
        self._memmap = None
        self._dset = None
        if self._file is not None and self._generation == _fork_generation:
            self._file.close()
        self._file = None
        self._generation = None

    @property
    def uses_memmap(self) -> bool:
        self._ensure_open()
        return self._memmap is not None

    def sample_shape(self) -> tuple[int, ...]:
        self._ensure_open()
        return self.shape[1:]

    def num_rows(self) -> int:
        self._ensure_open()
        return int(self.shape[0])

    def memmap_array(self) -> np.memmap | None:
        """The read-only memory map of the whole dataset (contiguous, uncompressed data), else None."""
        self._ensure_open()
        return self._memmap

    def dtype_after_open(self) -> np.dtype:
        self._ensure_open()
        return self.dtype

    # ------------------------------------------------------------------ reads
    def read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` (any order, duplicates allowed) into ``out`` (or a new array), in that order.

        ``out`` may have another dtype than the file (the values are cast while copying).
        """
        self._ensure_open()
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if len(rows) == 0:
            return out
        if self._memmap is not None:
            self._gather_memmap(rows, out)
        elif self._dset is not None and self._dset.chunks is not None:
            self._gather_chunked(rows, out)
        else:
            self._gather_fallback(rows, out)
        return out

    def _gather_memmap(self, rows: np.ndarray, out: np.ndarray) -> None:
        assert self._memmap is not None
        if out.dtype == self._memmap.dtype:
            # mode="clip" lets numpy write straight into `out`; with the default mode it buffers
            # the whole result first. Rows were range-checked when the split was made.
            np.take(self._memmap, rows, axis=0, out=out, mode="clip")
        else:
            out[...] = np.take(self._memmap, rows, axis=0, mode="clip")

    def _gather_chunked(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Read each touched chunk once (as the row range the batch needs) and scatter its rows."""
        assert self._dset is not None
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        chunk_ids = sorted_rows // self._chunk_rows
        bounds = np.flatnonzero(np.diff(chunk_ids)) + 1
        starts = np.concatenate(([0], bounds))
        ends = np.concatenate((bounds, [len(rows)]))
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            lo, hi = int(sorted_rows[s]), int(sorted_rows[e - 1]) + 1
            block = self._dset[lo:hi]
            out[order[s:e]] = block[sorted_rows[s:e] - lo]

    def _gather_fallback(self, rows: np.ndarray, out: np.ndarray) -> None:
        assert self._dset is not None
        unique, inverse = np.unique(rows, return_inverse=True)
        data = self._dset[unique] if len(unique) > 1 else self._dset[int(unique[0]) : int(unique[0]) + 1]
        out[...] = data[inverse]

    def read_range(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` as a new array (used for streaming statistics and copies)."""
        self._ensure_open()
        if self._memmap is not None:
            return np.array(self._memmap[lo:hi])
        assert self._dset is not None
        return self._dset[lo:hi]
