"""The split dataset: one ``__getitem__`` per batch (torch).

``H5Split[IndexBatch]`` maps split-local positions to file rows, reads all of them at once with
:class:`~dist_train.data.h5io.RowReader` (memmap gather, or one read per touched chunk) and
returns the batch in exactly the sampler's order. Inside a DataLoader worker (when made by
``make_loader``) the whole batch is written into one buffer born in shared memory, a
:class:`PackedBatch`, so handing it to the main process costs no copy and a single handle;
``make_loader``'s loader turns it back into the dict.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from dist_train.data.h5io import RowReader
from dist_train.data.transforms import BatchTransforms
from dist_train.errors import DataError


class H5Split(Dataset):  # type: ignore[type-arg]
    """The rows of one split of an HDF5 file; ``len()`` = samples, items are whole batches."""

    def __init__(
        self,
        path: Path | str,
        rows: np.ndarray,
        *,
        x_key: str = "event_data",
        y_key: str = "labels",
        extra_keys: list[str] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        transforms: list[str] | None = None,
        name: str = "train",
    ) -> None:
        self.path = str(path)
        self.rows = np.ascontiguousarray(rows, dtype=np.int64)
        self.x_key = x_key
        self.y_key = y_key
        self.extra_keys = list(extra_keys or [])
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None
        self.name = name
        self.transforms = BatchTransforms(list(transforms or []), f"data.{'train' if name == 'train' else 'eval'}_transforms")
        # Readers hold no handle until the first read in the process that reads (see RowReader).
        self._x = RowReader(self.path, x_key)
        self._y = RowReader(self.path, y_key)
        self._extra = {k: RowReader(self.path, k) for k in self.extra_keys}
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None
        self._labels: np.ndarray | None = None
        self._specs: list[tuple[str, torch.dtype, tuple[int, ...]]] | None = None
        # Set by make_loader: batches read in a worker travel as one PackedBatch, which the
        # loader unpacks; a bare DataLoader over this dataset gets plain dicts.
        self.pack_in_workers = False

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # Caches are rebuilt on first use in the process that reads.
        state.update(_norm=None, _labels=None, _specs=None)
        return state

    def with_transforms(self, transforms: list[str], where: str | None = None) -> H5Split:
        """A copy that applies ``transforms`` (the same rows and files)."""
        clone = H5Split.__new__(H5Split)
        clone.__dict__.update(self.__getstate__())
        clone._x = RowReader(self.path, self.x_key)
        clone._y = RowReader(self.path, self.y_key)
        clone._extra = {k: RowReader(self.path, k) for k in self.extra_keys}
        clone.transforms = BatchTransforms(list(transforms), where or self.transforms.where)
        return clone

    def sample_shape(self) -> tuple[int, ...]:
        return self.transforms.output_shape(self._x.sample_shape())

    # ------------------------------------------------------------------ reading
    def __getitem__(self, batch: Any) -> dict[str, torch.Tensor] | PackedBatch:
        if isinstance(batch, int | np.integer):
            one = self[[int(batch)]]
            assert isinstance(one, dict)
            return {k: v[0] for k, v in one.items()}
        positions = np.asarray(batch, dtype=np.int64).reshape(-1)
        # Fancy indexing raises IndexError past the end; samplers never produce negative positions.
        rows = self.rows[positions]
        seed = int(getattr(batch, "seed", 0))
        pack = self.pack_in_workers and get_worker_info() is not None
        try:
            return self._read_batch(positions, rows, seed, pack)
        except OSError as exc:
            raise DataError(
                f"reading rows of {self.path!r} failed ({exc}); the file is corrupt, truncated or was replaced "
                "while training."
            ) from None

    def _read_batch(self, positions: np.ndarray, rows: np.ndarray, seed: int, pack: bool) -> dict[str, torch.Tensor] | PackedBatch:
        b = len(rows)
        specs = [(key, dtype, (b, *shape)) for key, dtype, shape in self._sample_specs()]
        packed = PackedBatch.allocate(specs) if pack else None
        out = packed.unpack() if packed is not None else {k: _empty(shape, dt) for k, dt, shape in specs}
        x = out["x"]
        if self.transforms:
            raw = _empty((b, *self._x.sample_shape()), torch.float32)
            self._x.read(rows, out=raw.numpy())
            x.copy_(self.transforms(raw, seed))
        else:
            self._x.read(rows, out=x.numpy())
        if self.mean is not None and self.std is not None:
            mean, std = self._norm_tensors(x.ndim)
            x.sub_(mean).div_(std)  # after the transforms, in place on memory this batch owns
        out["y"].numpy()[:] = self._split_labels()[positions]
        out["index"].numpy()[:] = rows
        for key, reader in self._extra.items():
            reader.read(rows, out=out[key].numpy())
        return packed if packed is not None else out

    def _sample_specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(key, dtype, per-sample shape) of each batch entry; worked out once per process."""
        if self._specs is None:
            x_shape = self.transforms.output_shape(self._x.sample_shape())
            specs = [("x", torch.float32, x_shape), ("y", torch.int64, ()), ("index", torch.int64, ())]
            for key, reader in self._extra.items():
                specs.append((key, _torch_dtype(reader.dtype_after_open()), reader.sample_shape()))
            self._specs = specs
        return self._specs

    def _split_labels(self) -> np.ndarray:
        # The labels of this split, read once per process: 8 bytes a sample, and a batch's labels
        # then cost one small take instead of another file read.
        if self._labels is None:
            self._labels = self._y.read(self.rows).reshape(-1).astype(np.int64, copy=False)
        return self._labels

    def _norm_tensors(self, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._norm is None or self._norm[0].ndim != ndim:
            assert self.mean is not None and self.std is not None
            view = (1, -1) + (1,) * max(0, ndim - 2) if ndim >= 2 else (-1,)
            self._norm = (
                torch.tensor(self.mean, dtype=torch.float32).view(view),
                torch.tensor(self.std, dtype=torch.float32).view(view),
            )
        return self._norm

    def read_labels(self) -> np.ndarray:
        """Labels of the whole split, in position order (int64)."""
        return self._split_labels().copy()

    def close(self) -> None:
        for reader in (self._x, self._y, *self._extra.values()):
            reader.close()


class PackedBatch:
    """A batch in one buffer: crossing from a worker costs one shared-memory handle, not one per key.

    Each tensor sent from a DataLoader worker is passed as its own file descriptor (a socket
    round trip to the worker per tensor); with x, y, index and extras in one storage the main
    process receives a single handle and :meth:`unpack` makes zero-copy views of it. The pin
    thread calls :meth:`pin_memory`, which pins the whole batch with one copy.
    """

    __slots__ = ("buffer", "layout")

    def __init__(self, buffer: torch.Tensor, layout: list[tuple[str, torch.dtype, tuple[int, ...], int]]) -> None:
        self.buffer = buffer
        self.layout = layout

    @staticmethod
    def allocate(specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> PackedBatch:
        layout = []
        offset = 0
        for key, dtype, shape in specs:
            layout.append((key, dtype, shape, offset))
            nbytes = math.prod(shape) * dtype.itemsize
            offset += -(-nbytes // _ALIGN) * _ALIGN
        # Born in shared memory (as default_collate does in workers), so sending it copies nothing.
        storage = torch.UntypedStorage._new_shared(max(offset, _ALIGN))
        buffer = torch.empty(0, dtype=torch.uint8).set_(storage)
        return PackedBatch(buffer, layout)

    def unpack(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, dtype, shape, offset in self.layout:
            nbytes = math.prod(shape) * dtype.itemsize
            out[key] = self.buffer[offset : offset + nbytes].view(dtype).view(shape)
        return out

    def pin_memory(self, device: Any = None) -> PackedBatch:
        pinned = self.buffer.pin_memory(device) if device is not None else self.buffer.pin_memory()
        return PackedBatch(pinned, self.layout)

    def __len__(self) -> int:
        return self.layout[0][2][0]


_ALIGN = 64


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    # numpy asks the kernel for huge pages on large buffers; a fresh 50 MB torch.empty faults in
    # 4 KiB pages, which made big-batch reads several times slower than the raw gather.
    np_dtype = _NUMPY_DTYPES.get(dtype)
    if np_dtype is None:
        np_dtype = _NUMPY_DTYPES[dtype] = torch.empty(0, dtype=dtype).numpy().dtype
    return torch.from_numpy(np.empty(shape, dtype=np_dtype))


_NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {}


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The tensor dtype an extra key is returned as (unsigned wider than a byte becomes int64)."""
    if dtype.kind == "u" and dtype.itemsize > 1:
        return torch.int64
    if dtype.kind == "b":
        return torch.bool
    return torch.from_numpy(np.empty(0, dtype=dtype.newbyteorder("="))).dtype
