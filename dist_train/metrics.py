"""What the training loop measures, reduced across ranks: task metric sums, throughput, memory.

Task metrics (loss, accuracy, regression errors) are *sums* (and a ``count``) per batch, added up
on the device in float64 (:class:`MetricSums`), combined across ranks by addition and turned into
means only once, on the totals (``Task.finalize``): never a mean of per-rank means. Quantiles
cannot come from sums, so evaluation also gathers per-sample values (:class:`SampleCollector`,
:class:`HistogramCollector`), each sample exactly once. The rest of the module times the epoch
and reads memory.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from dist_train.distributed.comm import all_gather_objects, all_reduce_max, all_reduce_sums

# Per-batch metric sums: tensors on the device (any shape, e.g. a confusion matrix) or host numbers.
Sums = dict[str, torch.Tensor | float | int]
# Turns the kept data of consecutive batches into their sums: per key, one row per batch, in order.
BatchReducer = Callable[[list[Any]], dict[str, torch.Tensor]]


class DeferredSums(NamedTuple):
    """A training batch's metric sums, computed later together with other batches' (see MetricSums.defer).

    A step then costs the trainer no metric kernels: ``reducer`` gets the ``data`` of many batches
    at once and returns each batch's sums, exactly the values it would have computed per batch.
    ``numbers`` (host numbers, the sample ``count``) are added right away.
    """

    reducer: BatchReducer
    data: Any
    numbers: dict[str, float]


@dataclass
class StepTimer:
    """Splits wall time into waiting for the loader and computing, for the data-wait fraction."""

    data_wait: float = 0.0
    total: float = 0.0
    samples: int = 0
    _t0: float = field(default_factory=time.perf_counter)
    _mark: float = field(default_factory=time.perf_counter)

    def start(self) -> None:
        self.data_wait = self.total = 0.0
        self.samples = 0
        self._t0 = self._mark = time.perf_counter()

    def fetching(self) -> None:
        """Called right before asking the loader for a batch: the wait starts now."""
        self._mark = time.perf_counter()

    def batch_arrived(self) -> None:
        now = time.perf_counter()
        self.data_wait += now - self._mark
        self._mark = now

    def step_done(self, samples: int) -> None:
        self.samples += samples

    def reduce(self, prefix: str) -> dict[str, float]:
        """Throughput from global samples over the slowest rank's time (ranks run in lock-step)."""
        self.total = time.perf_counter() - self._t0
        sums = all_reduce_sums({"samples": float(self.samples), "wait": self.data_wait, "time": self.total})
        slowest = all_reduce_max({"time": self.total})["time"]
        return {
            f"{prefix}/samples_per_s": sums["samples"] / max(slowest, 1e-9),
            f"{prefix}/data_wait_frac": sums["wait"] / max(sums["time"], 1e-9),
            f"{prefix}/epoch_time_s": slowest,
        }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        # ru_maxrss is KiB on Linux: the peak resident set of this process.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except OSError:  # pragma: no cover
        return 0.0


def rss_anon_mb() -> float | None:
    """This process's own (anonymous) resident memory: without the pages of memory-mapped files.

    A memory-mapped HDF5 file's pages count in the resident set (``peak_memory_mb`` on the CPU) as
    they are read, but they are the kernel's page cache, shared and dropped under pressure; this is
    the memory that grows only if something is really kept. Linux only (None elsewhere).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def _tensors_bytes(tensors: Iterable[object]) -> int:
    """Bytes this rank holds of ``tensors``: a DTensor's (FSDP2's) own shard, any other tensor whole."""
    # Deferred (0.7 s per process, see distributed/strategy.py); torch < 2.5 has no public DTensor,
    # and no FSDP2 strategy in dtrain either.
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        DTensor = ()  # type: ignore[assignment,misc]  # noqa: N806
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            held = t.to_local() if isinstance(t, DTensor) else t
            total += held.numel() * held.element_size()
    return total


def training_state_mb(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """This rank's share of what training keeps between steps: parameters, gradients, optimizer state (MiB).

    Call it after the optimizer's step and before ``zero_grad``: gradients and the optimizer's
    state (Adam's moments) exist then. Under DDP every rank holds all of it; under FSDP each rank
    holds its shards, about 1/world of each. Communication buffers (DDP's gradient buckets, FSDP's
    all-gathered units) and activations are not state: they show in the peak memory instead.
    """
    params = list(model.parameters())
    optimizer_tensors = (v for per_param in optimizer.state.values() for v in per_param.values())
    state = {
        "memory/params_mb": _tensors_bytes(params) / 2**20,
        "memory/grads_mb": _tensors_bytes(p.grad for p in params) / 2**20,
        "memory/optimizer_mb": _tensors_bytes(optimizer_tensors) / 2**20,
    }
    state["memory/state_mb"] = sum(state.values())
    return state


class MetricSums:
    """The distributed AverageMeter: named sums accumulated on the device, reduced exactly.

    ``add`` costs one in-place add per key (no host sync); ``reduce`` is a collective that every
    rank calls at the same point. Keys may differ between ranks (a rank with no evaluation batch
    has none): the reduction gathers each rank's sums and adds them in rank order, so every rank
    gets bit-identical totals, whatever the world size.

    ``defer`` keeps a batch's data instead of its sums; the kept batches are reduced together
    (``MAX_DEFERRED`` at a time, or when the sums are read) and their sums added one batch after
    the other: the totals are bit-identical to adding each batch's sums at its step, whenever the
    flush happens (a checkpoint in the middle of an epoch does not change them). On the CPU only:
    there the kernels of a step run in the trainer's thread, which is what deferring saves, and the
    reductions of stacked batches are checked to add in the same order as one batch's; a GPU's
    reduction kernels may choose another order for another number of stacked batches, which would
    make the totals depend on the flush points, so there each batch is reduced at its step.
    """

    #: Batches kept before their sums are computed (their data is a few values per sample).
    MAX_DEFERRED = 64

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._max_deferred = self.MAX_DEFERRED if device.type == "cpu" else 1
        self.reset()

    def reset(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        self._numbers: dict[str, float] = {}
        self._deferred: list[DeferredSums] = []

    def add(self, values: Sums) -> None:
        if self._deferred and values:
            self._flush()  # keeps the order in which batches are added
        for key, value in values.items():
            acc = self._tensors.get(key)
            if acc is not None:
                acc += value.detach() if isinstance(value, torch.Tensor) else value
            elif isinstance(value, torch.Tensor):
                # float64: sums of many float32 values stay exact enough to match a 1-process run at 1e-6.
                self._tensors[key] = value.detach().to(torch.float64, copy=True)
            else:  # host numbers (sample counts) stay on the host: no device op per step
                self._numbers[key] = self._numbers.get(key, 0.0) + float(value)

    def defer(self, item: DeferredSums) -> None:
        """Add a batch's sums later (see the class docstring); its ``numbers`` now."""
        for key, value in item.numbers.items():
            self._numbers[key] = self._numbers.get(key, 0.0) + float(value)
        self._deferred.append(item)
        if len(self._deferred) >= self._max_deferred:
            self._flush()

    def _flush(self) -> None:
        deferred, self._deferred = self._deferred, []
        start = 0
        while start < len(deferred):  # runs of batches with the same reducer, in order
            reducer = deferred[start].reducer
            end = start + 1
            while end < len(deferred) and deferred[end].reducer == reducer:
                end += 1
            for key, rows in reducer([item.data for item in deferred[start:end]]).items():
                self._add_rows(key, rows)
            start = end

    def _add_rows(self, key: str, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float64)
        acc = self._tensors.get(key)
        if acc is None:
            acc = self._tensors[key] = rows[0].clone()
            rows = rows[1:]
        add_rows_in_order(acc, rows, scan=rows.device.type == "cpu")

    def local_sums(self) -> dict[str, np.ndarray]:
        """This rank's sums on the host (picklable; what a checkpoint stores for a partial epoch)."""
        if self._deferred:
            self._flush()
        out = {k: v.cpu().numpy() for k, v in self._tensors.items()}
        out.update({k: np.asarray(v, dtype=np.float64) for k, v in self._numbers.items()})
        return out

    def load_sums(self, sums: Mapping[str, Any]) -> None:
        """Restore sums saved by :meth:`local_sums`."""
        self.reset()
        for key, value in sums.items():
            array = np.asarray(value, dtype=np.float64)
            if key == "count":
                self._numbers[key] = float(array)
            else:  # on the device, where add() puts tensor values (a number added later adds to it too)
                self._tensors[key] = torch.from_numpy(array.copy()).to(self.device)

    def reduce(self) -> dict[str, np.ndarray]:
        """Global sums over every rank (a collective)."""
        return add_sums(all_gather_objects(self.local_sums()))


# Why the totals are exact, i.e. equal to a one-process evaluation of the same batches:
# float64 addition is not associative, so a sum is reproducible only if the same numbers are
# added in the same order. Every place that combines sums here fixes that order instead of
# leaving it to a kernel: a rank adds its batches' sums one batch after the other
# (``add_rows_in_order``, whether the batch was reduced at its step or deferred and reduced in a
# stack of 64), and ranks are then added in rank order (``add_sums``). Each batch's own sums are
# computed by the same kernel as in one process, so the per-batch values agree bit for bit and
# so does their fixed-order total; the float64 accumulation keeps the one remaining difference
# from a one-process run (the partition of batches over ranks) under the 1e-6 the tests check.
# CPU and GPU differ in which reductions keep their order: on the CPU ``torch.cumsum`` adds rows
# strictly left to right and a reduction over a stack of batches adds each batch's elements in
# the same order as over one batch (tests/test_task_hotpath.py checks the scan and that the
# flush points do not change the totals), so deferring many
# batches and flushing them with one scan changes nothing. A GPU's scan and reduction kernels
# pick their tree order from the tensor shape, so a stack of 64 batches could sum differently
# from 64 single batches and the totals would depend on when the flush happened (e.g. a
# mid-epoch checkpoint); there ``MetricSums`` flushes every batch at its step and adds rows one
# at a time.
def add_rows_in_order(acc: torch.Tensor, rows: torch.Tensor, *, scan: bool) -> None:
    """``acc += rows[0]; acc += rows[1]; ...`` in place: the float64 result of adding batch by batch.

    ``scan``: with one cumsum, which on the CPU adds in order (three kernels instead of one per
    row); a GPU scan adds in another order, so there it is one add per row.
    """
    if scan:
        acc.copy_(torch.cumsum(torch.cat((acc.unsqueeze(0), rows)), dim=0)[-1])
    else:
        for row in rows:
            acc += row


def add_sums(per_rank: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Element-wise sum of every rank's sums, in rank order (the same result on every rank)."""
    total: dict[str, np.ndarray] = {}
    for sums in per_rank:
        for key, value in sums.items():
            value = np.asarray(value, dtype=np.float64)
            total[key] = total[key] + value if key in total else value.copy()
    total.setdefault("count", np.zeros((), dtype=np.float64))
    return total


class SampleCollector:
    """Per-sample values of an evaluation, gathered from every rank in shard order."""

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {}

    def add(self, values: Mapping[str, torch.Tensor]) -> None:
        for key, value in values.items():
            self._parts.setdefault(key, []).append(value.detach().double().reshape(-1).cpu().numpy())

    def gather(self) -> dict[str, np.ndarray]:
        """Every rank's values, rank 0's first: evaluation shards are contiguous, so this is file order."""
        local = {k: np.concatenate(v) for k, v in self._parts.items()}
        out: dict[str, list[np.ndarray]] = {}
        for part in all_gather_objects(local):
            for key, value in part.items():
                out.setdefault(key, []).append(value)
        return {k: np.concatenate(v) for k, v in out.items()}


class HistogramCollector:
    """Histograms of per-sample values over every rank's shard, without moving the values.

    Each rank keeps its own values; the ranks agree on each key's range (one gather of extremes),
    bin their values with the same edges and add the counts: the counts of ``np.histogram`` of all
    the values at once, for the traffic of a few numbers per bin.
    """

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self._parts: dict[str, list[np.ndarray]] = {}

    def add(self, values: Mapping[str, torch.Tensor]) -> None:
        for key, value in values.items():
            self._parts.setdefault(key, []).append(value.detach().double().reshape(-1).cpu().numpy())

    def reduce(self) -> dict[str, dict[str, Any]]:
        """Per key: ``edges`` (bins + 1), ``counts``, and the ``sum`` and ``sum_squares`` of the finite values."""
        local = {k: _finite(np.concatenate(v)) for k, v in self._parts.items()}
        extremes: dict[str, list[float]] = {}
        for part in all_gather_objects(
            {k: [v.min(), v.max(), v.sum(), np.square(v).sum()] for k, v in local.items() if len(v)}
        ):
            for key, (low, high, total, squares) in part.items():
                seen = extremes.setdefault(key, [low, high, 0.0, 0.0])
                seen[:] = [min(seen[0], low), max(seen[1], high), seen[2] + total, seen[3] + squares]
        edges = {k: _histogram_edges(low, high, self.bins) for k, (low, high, _, _) in extremes.items()}
        counts = {k: np.histogram(local.get(k, np.zeros(0)), bins=e)[0].astype(np.float64) for k, e in edges.items()}
        totals = add_sums(all_gather_objects(counts))
        return {
            k: {
                "edges": e.tolist(),
                "counts": totals[k].astype(np.int64).tolist(),
                "sum": float(extremes[k][2]),
                "sum_squares": float(extremes[k][3]),
            }
            for k, e in edges.items()
        }


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _histogram_edges(low: float, high: float, bins: int) -> np.ndarray:
    """np.histogram's own edges for values from ``low`` to ``high`` (a unit wide range when they are equal)."""
    if low == high:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, bins + 1)
