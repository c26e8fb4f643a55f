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

from dist_train.data.aligned import aligned_empty
from dist_train.data.device_feed import NARROW_DTYPES, DevicePrep
from dist_train.data.h5io import RowReader
from dist_train.data.hits import HitReader, HitSpec, extra_reader
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
        y_key: str | None = "labels",
        extra_keys: list[str] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        transforms: list[str] | None = None,
        name: str = "train",
        layout: str = "channels_first",
        hits: HitSpec | None = None,
    ) -> None:
        self.path = str(path)
        self.rows = np.ascontiguousarray(rows, dtype=np.int64)
        self.x_key = x_key
        self.y_key = y_key
        self.extra_keys = list(extra_keys or [])
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None
        self.name = name
        # (H, W, C) samples are permuted to (C, H, W) once per batch, before transforms and normalisation.
        self.channels_last = layout == "channels_last"
        self.transforms = BatchTransforms(
            list(transforms or []), f"data.{'train' if name == 'train' else 'eval'}_transforms"
        )
        self.hits = hits
        # Readers hold no handle until the first read in the process that reads (see RowReader).
        self._x = self._new_x_reader()
        # Class labels as batch["y"] (classification); None: no "y" (regression and custom tasks
        # read their targets under their own names, and a file without labels is fine).
        self._y = RowReader(self.path, y_key) if y_key is not None else None
        self._extra = {k: extra_reader(self.path, k, hits) for k in self.extra_keys}
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None
        self._labels: np.ndarray | None = None
        self._specs: list[tuple[str, torch.dtype, tuple[int, ...]]] | None = None
        # Set by make_loader: batches read in a worker travel as one PackedBatch, which the
        # loader unpacks; a bare DataLoader over this dataset gets plain dicts.
        self.pack_in_workers = False
        # Set by defer_to_device: x leaves the host as read (no normalisation, maybe the file's dtype and layout).
        self.deferred = False

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
        clone._x = self._new_x_reader()
        clone._y = RowReader(self.path, self.y_key) if self.y_key is not None else None
        clone._extra = {k: extra_reader(self.path, k, self.hits) for k in self.extra_keys}
        clone.transforms = BatchTransforms(list(transforms), where or self.transforms.where)
        return clone

    def _new_x_reader(self) -> RowReader | HitReader:
        """x as stored (``x_key``), or built from a hit-list file (``data.format = "hits"``)."""
        return HitReader(self.path, self.hits) if self.hits is not None else RowReader(self.path, self.x_key)

    def sample_shape(self) -> tuple[int, ...]:
        return self.transforms.output_shape(self._channels_first_shape())

    def _channels_first_shape(self) -> tuple[int, ...]:
        stored = self._x.sample_shape()
        if self.channels_last and len(stored) >= 2:
            return (stored[-1], *stored[:-1])
        return stored

    def _as_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """A batch as (B, C, H, W): for channels-last files one permuting copy of the whole batch."""
        if not self.channels_last or x.ndim < 3 or self._permutes_on_device():
            return x
        return x.permute(0, x.ndim - 1, *range(1, x.ndim - 1)).contiguous()

    # ------------------------------------------------------------------ work left to the device
    def defer_to_device(self) -> DevicePrep:
        """Leave the normalisation (and, without transforms, the cast and the channels-last permutation)
        to the device: returns what the device does after the copy (see ``dist_train.data.device_feed``).

        Call before the first read in this process (the batch specs are worked out once)."""
        self.deferred = True
        self._specs = None
        return DevicePrep(self.mean, self.std, from_channels_last=self._permutes_on_device())

    def _sends_as_stored(self) -> bool:
        """Deferred, no transforms (they work in float32) and a narrow file dtype: x is sent as stored."""
        if not self.deferred or self.transforms or not isinstance(self._x, RowReader):
            return False
        return self._x.dtype_after_open().name in NARROW_DTYPES

    def _permutes_on_device(self) -> bool:
        return self.deferred and self.stored_batch_is_channels_last()

    def stored_batch_is_channels_last(self) -> bool:
        """Whether a batch as stored, (B, H, W, C), viewed as (B, C, H, W) is what the model takes: a
        channels-last file without transforms (they need (C, H, W) samples, so with transforms the host permutes)."""
        return self.channels_last and not self.transforms

    def x_dtype(self) -> np.dtype:
        """The dtype of the buffer :meth:`gather` reads x into (float32, or the file's when sent as stored)."""
        return self._x.dtype_after_open() if self._sends_as_stored() else np.dtype(np.float32)

    # ------------------------------------------------------------------ reading
    def __getitem__(self, batch: Any) -> dict[str, torch.Tensor] | PackedBatch:
        if isinstance(batch, int | np.integer):
            one = self[[int(batch)]]
            assert isinstance(one, dict)
            return {k: v[0] for k, v in one.items()}
        if self.pack_in_workers and get_worker_info() is not None:
            positions = _positions(batch)
            # Fancy indexing raises IndexError past the end; samplers never produce negative positions.
            rows = self.rows[positions]
            try:
                return self._read_packed(positions, rows, int(getattr(batch, "seed", 0)))
            except OSError as exc:
                raise self._read_error(exc) from None
        return self.finish_in_consumer(self.gather(self.plan(batch)), batch)

    def _read_error(self, exc: OSError) -> DataError:
        return DataError(
            f"reading rows of {self.path!r} failed ({exc}); the file is corrupt, truncated or was replaced "
            "while training."
        )

    # ------------------------------------------------------------------ in-process prefetch
    def on_fast_path(self) -> bool:
        """Whether every per-batch read (x and the extra keys) is a memmap gather (no HDF5 call)."""
        return all(reader.uses_memmap for reader in (self._x, *self._extra.values()))

    def prepare_in_this_process(self) -> None:
        """Open the files and build the caches now, before reader threads share this object."""
        self._sample_specs()
        if self._y is not None:
            self._split_labels()
        self._x.sample_shape()

    @property
    def defers_random_transforms(self) -> bool:
        return self.transforms.is_random

    def raw_x_shape(self, batch: Any) -> tuple[int, ...]:
        """Shape of the float32 buffer :meth:`gather` reads ``batch``'s samples into."""
        return (len(batch), *self._x.sample_shape())

    def plan(self, batch: Any, raw: np.ndarray | None = None) -> PlannedBatch:
        """Everything about a batch but the sample reads: positions, rows, labels, buffers.

        The in-process loader calls this in the consuming thread and :meth:`gather` in a reader
        thread, so the reader thread holds the GIL only briefly (the gather itself releases it).
        ``raw`` is the buffer for the samples (shape :meth:`raw_x_shape`, dtype :meth:`x_dtype`); None: a new one.
        """
        positions = _positions(batch)
        # Fancy indexing raises IndexError past the end; samplers never produce negative positions.
        rows = self.rows[positions]
        if raw is None:
            raw = aligned_empty((len(rows), *self._x.sample_shape()), self.x_dtype())
        out: dict[str, torch.Tensor | None] = {"x": None}  # x: filled by gather()
        if self._y is not None:
            out["y"] = torch.from_numpy(self._split_labels()[positions])  # fancy indexing: a new array
        out["index"] = torch.from_numpy(rows)  # also a new array, made just above
        if self._extra:
            for key, dtype, shape in self._sample_specs()[len(self._fixed_keys()) :]:
                out[key] = _empty((len(rows), *shape), dtype)
        return PlannedBatch(out, rows, raw, int(getattr(batch, "seed", 0)))

    def gather(self, job: PlannedBatch) -> dict[str, torch.Tensor]:
        """Read the samples of a planned batch and apply the deterministic transforms and the
        normalisation (random transforms, if any, are left to :meth:`finish_in_consumer`: they
        must run in the consuming thread, see ``dist_train.data.prefetch``). Thread-safe."""
        try:
            x = self._as_channels_first(torch.from_numpy(self._x.read(job.rows, out=job.raw)))
            for key, reader in self._extra.items():
                reader.read(job.rows, out=job.out[key].numpy())  # type: ignore[union-attr]
        except OSError as exc:
            raise self._read_error(exc) from None
        if not self.transforms.is_random:
            x = self._transform_and_normalize(x, job.seed)
        job.out["x"] = x
        return job.out  # type: ignore[return-value]

    def finish_in_consumer(self, out: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
        """Apply what :meth:`gather` left out (random transforms, then normalisation)."""
        if self.transforms.is_random:
            out["x"] = self._transform_and_normalize(out["x"], int(getattr(batch, "seed", 0)))
        return out

    def _transform_and_normalize(self, raw: torch.Tensor, seed: int) -> torch.Tensor:
        """Transforms, then per-channel normalisation; ``raw`` belongs to this batch and may be reused."""
        x = self.transforms(raw, seed).contiguous() if self.transforms else raw
        if self.mean is not None and self.std is not None and not self.deferred:
            mean, std = self._norm_tensors(x.ndim)
            x.sub_(mean).div_(std)  # in place: on the batch's own memory (raw or the transforms' output)
        return x

    def _read_packed(self, positions: np.ndarray, rows: np.ndarray, seed: int) -> PackedBatch:
        """The batch written into one shared-memory buffer (in a DataLoader worker process)."""
        b = len(rows)
        specs = [(key, dtype, (b, *shape)) for key, dtype, shape in self._sample_specs()]
        packed = PackedBatch.allocate(specs)
        out = packed.unpack()
        x = out["x"]
        if self.transforms or (self.channels_last and not self._permutes_on_device()):
            raw = _empty((b, *self._x.sample_shape()), torch.float32)
            self._x.read(rows, out=raw.numpy())
            raw = self._as_channels_first(raw)
            x.copy_(self.transforms(raw, seed) if self.transforms else raw)
        else:
            self._x.read(rows, out=x.numpy())
        if self.mean is not None and self.std is not None and not self.deferred:
            mean, std = self._norm_tensors(x.ndim)
            x.sub_(mean).div_(std)  # after the transforms, in place on memory this batch owns
        if self._y is not None:
            np.take(self._split_labels(), positions, out=out["y"].numpy(), mode="clip")  # positions checked above
        out["index"].numpy()[:] = rows
        for key, reader in self._extra.items():
            reader.read(rows, out=out[key].numpy())
        return packed

    def _sample_specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(key, dtype, per-sample shape) of each batch entry; worked out once per process."""
        if self._specs is None:
            if self._permutes_on_device():
                x_shape = self._x.sample_shape()  # as stored: the device permutes
            else:
                x_shape = self.transforms.output_shape(self._channels_first_shape())
            specs = [("x", _torch_dtype(self.x_dtype()), x_shape)]
            if self._y is not None:
                specs.append(("y", torch.int64, ()))
            specs.append(("index", torch.int64, ()))
            for key, reader in self._extra.items():
                specs.append((key, _torch_dtype(reader.dtype_after_open()), reader.sample_shape()))
            self._specs = specs
        return self._specs

    def _fixed_keys(self) -> tuple[str, ...]:
        """The batch entries before the extra keys, in :meth:`_sample_specs` order."""
        return ("x", "y", "index") if self._y is not None else ("x", "index")

    def _split_labels(self) -> np.ndarray:
        # The labels of this split, read once per process: 8 bytes a sample, and a batch's labels
        # then cost one small take instead of another file read.
        if self._y is None:
            raise DataError(f"split {self.name!r} has no class labels: only classification reads data.y_key.")
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
        for reader in (self._x, *([self._y] if self._y is not None else []), *self._extra.values()):
            reader.close()


class PlannedBatch:
    """A batch between :meth:`H5Split.plan` and :meth:`H5Split.gather`."""

    __slots__ = ("out", "rows", "raw", "seed")

    def __init__(self, out: dict[str, torch.Tensor | None], rows: np.ndarray, raw: np.ndarray, seed: int) -> None:
        self.out = out
        self.rows = rows
        self.raw = raw
        self.seed = seed


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


def _positions(batch: Any) -> np.ndarray:
    if isinstance(batch, list):  # IndexBatch: fromiter skips asarray's type inference (~1 us per batch)
        return np.fromiter(batch, dtype=np.int64, count=len(batch))
    return np.asarray(batch, dtype=np.int64).reshape(-1)


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
