"""The last leg of a batch: host memory -> the device, and what is cheaper to do there (torch).

On a GPU the loader leaves three things to the device (``make_loader`` asks the split to, see
:meth:`dist_train.data.dataset.H5Split.defer_to_device`; on the CPU it does so only for a channels_last
model on a channels-last file, whose stored batch viewed as (B, C, H, W) already has the model's layout):

* the cast: a file stored as uint8, int8, int16 or float16 is read and sent in that dtype (2-4x
  fewer bytes read, pinned and copied than float32) and widened to float32 after the copy. The
  widening is exact, so the numbers are the ones the host's float32 read gave;
* the normalisation: ``(x - mean) / std`` per channel in float32, the same two IEEE operations the
  host did in place, so the result is bit-identical (a multiplication by ``1 / std`` would not be);
* the permutation of channels-last files ((B, H, W, C) -> (B, C, H, W)): a view on the device, made
  contiguous there (or left as it is when the model runs channels-last: that view *is* that layout).

On CUDA the copies and that work run on a side stream (:class:`DeviceFeed`): the copy of batch
``i + 1`` overlaps step ``i``'s kernels instead of queueing behind them on the compute stream. The
compute stream waits for the side stream before it uses the batch (a GPU-side wait, the host never
blocks), and every tensor handed to it is marked with ``record_stream`` so the caching allocator does
not give its memory back to the side stream while the step still reads it. Pinned source memory
comes from torch's caching host allocator (``pin_memory()``), which itself keeps a block until the
copies reading it are done. On the CPU none of this exists: the batch is used where it is, and a
deferred preparation runs in the training thread. benchmarks/host_step.py measures each of these choices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

# File dtypes sent as stored: widening them to float32 on the device is exact.
NARROW_DTYPES = frozenset({"uint8", "int8", "int16", "float16"})


def batch_to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a batch on ``device`` (asynchronous copies from pinned memory on CUDA)."""
    if device.type == "cpu":  # the loaders' batches are there already: no .to() per key and step
        return dict(batch)
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) for k, v in batch.items()}


class DevicePrep:
    """What the device does to ``x`` after the copy: channels-first view, float32, ``(x - mean) / std``."""

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None, *, from_channels_last: bool) -> None:
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None
        self.from_channels_last = from_channels_last
        self._norm: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def norm_tensors(self, device: torch.device, ndim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) shaped to broadcast over a (B, C, ...) batch of ``ndim`` dims, on ``device``; made once."""
        if self.mean is None or self.std is None:
            return None
        key = (device, ndim)
        if key not in self._norm:
            view = (1, -1) + (1,) * max(0, ndim - 2) if ndim >= 2 else (-1,)
            self._norm[key] = (
                torch.tensor(self.mean, dtype=torch.float32).view(view).to(device),
                torch.tensor(self.std, dtype=torch.float32).view(view).to(device),
            )
        return self._norm[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the host path would have made it (up to memory layout); ``x`` is the batch's own memory."""
        if self.from_channels_last and x.ndim >= 3:
            x = x.permute(0, x.ndim - 1, *range(1, x.ndim - 1))  # a view: the layout is fixed by the caller
        if x.dtype != torch.float32:
            x = x.to(torch.float32)  # exact for the NARROW_DTYPES; keeps the strides
        norm = self.norm_tensors(x.device, x.ndim)
        if norm is not None:
            x.sub_(norm[0]).div_(norm[1])  # in place, as on the host: the same numbers bit for bit
        return x


class Streams(Protocol):
    """The CUDA stream calls :class:`DeviceFeed` makes (tests replace them with a recording fake)."""

    def compute(self) -> Any: ...
    def side(self) -> contextlib.AbstractContextManager[Any]: ...
    def compute_waits_for_side(self) -> None: ...
    def used_by_compute(self, tensor: torch.Tensor) -> None: ...


class CudaStreams:
    """A side stream for the copies; ``compute`` is the stream current when the feed is called."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        # Constants made on the compute stream (mean/std) must be there before the side stream reads them.
        self.stream.wait_stream(torch.cuda.current_stream(device))

    def compute(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def side(self) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(self.stream)

    def compute_waits_for_side(self) -> None:
        self.compute().wait_stream(self.stream)

    def used_by_compute(self, tensor: torch.Tensor) -> None:
        tensor.record_stream(self.compute())


class DeviceFeed:
    """Host batch -> device batch: copy, then ``prep`` on ``x``, then the memory layout the model wants.

    ``channels_last``: 4-d ``x`` in ``torch.channels_last`` memory format (for a model converted to it);
    otherwise contiguous. ``streams``: the side stream machinery (default: a CUDA side stream on a
    CUDA device, none elsewhere).
    """

    def __init__(
        self,
        device: torch.device,
        prep: DevicePrep | None = None,
        *,
        channels_last: bool = False,
        streams: Streams | None = None,
    ) -> None:
        self.device = device
        self.prep = prep
        self.channels_last = channels_last
        if streams is None and device.type == "cuda":
            if prep is not None:
                prep.norm_tensors(device, 4)  # the usual image constants, made before the side stream waits for them
            streams = CudaStreams(device)
        self.streams = streams

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.streams is None:
            return self._finish(batch_to_device(batch, self.device))
        streams = self.streams
        with streams.side():
            out = self._finish({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        streams.compute_waits_for_side()
        for tensor in out.values():
            streams.used_by_compute(tensor)
        return out

    def _finish(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.prep is None and not self.channels_last:
            return batch
        x = batch["x"]
        if self.prep is not None:
            x = self.prep(x)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        elif not x.is_contiguous():
            x = x.contiguous()
        batch["x"] = x
        return batch
