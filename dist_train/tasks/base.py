"""What every task shares: the interface the trainer calls and the exact metric sums.

A task owns the loss, the metrics and the predictions; the loop, samplers, AMP, checkpoints and
preemption are the same for all tasks. Metrics are *sums* (and a ``count``) per batch, added up
on the device in float64, combined across ranks by addition and turned into means only once, on
the totals (``finalize``): never a mean of per-rank means. Quantiles cannot come from sums, so a
task may also return per-sample values during evaluation (``eval_samples``); they are gathered
from every rank (each sample exactly once) and reduced with numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from dist_train.distributed.comm import all_gather_objects

Batch = Mapping[str, torch.Tensor]
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


class TrainStep(NamedTuple):
    """One training micro-batch's results: the loss to differentiate and the metric sums.

    The batch's loss sum is ``loss / loss_divisor``: a task whose loss sum ends in a division
    (regression's mean over target columns) leaves it to the trainer, which folds it into the
    backward seed with its own division by the window's samples (the same gradients, two autograd
    nodes fewer per step).
    """

    loss: torch.Tensor
    loss_divisor: int
    sums: Sums
    deferred: DeferredSums | None = None


class Task:
    """Base class of the built-in tasks; a custom task is adapted to it by ``CustomTask``.

    Subclasses implement :meth:`loss` and :meth:`metrics`; the rest has useful defaults.
    """

    #: Short name used in logs and errors.
    name = "task"
    #: Model output width the task needs (passed to the model as ``num_classes``); None: not checked.
    output_width: int | None = None
    #: HDF5 datasets the task reads into every batch besides ``x`` (its targets).
    batch_keys: tuple[str, ...] = ()
    #: Whether :meth:`eval_histograms` returns anything (else evaluation skips their reduction).
    has_histograms = False

    def loss(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """The loss SUMMED over the batch's samples (dtrain divides by the global sample count)."""
        raise NotImplementedError

    def metrics(self, outputs: Any, batch: Batch) -> Sums:
        """Per-batch sums for training; must include ``count`` (samples in the batch)."""
        raise NotImplementedError

    def train_step(self, outputs: Any, batch: Batch) -> TrainStep:
        """What the trainer calls per micro-batch: the loss sum (added to the sums as ``loss``) and
        :meth:`metrics`. Tasks override it to share work between the two or to defer the metrics."""
        loss = self.loss(outputs, batch)
        return TrainStep(loss, 1, {"loss": loss.detach(), **self.metrics(outputs, batch)})

    def eval_metrics(self, outputs: Any, batch: Batch) -> Sums:
        """Per-batch sums for evaluation (default: the training sums)."""
        return self.metrics(outputs, batch)

    def eval_samples(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-sample values (1-D) whose quantiles are reported after evaluation; default none."""
        return {}

    def finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        """Metrics from the global sums (``sums["loss"]`` is the loss sum dtrain adds)."""
        count = max(float(sums["count"]), 1.0)
        return {k: float(np.sum(v)) / count for k, v in sums.items() if k != "count" and np.size(v) == 1}

    def finalize_samples(self, samples: dict[str, np.ndarray]) -> dict[str, float]:
        """Metrics from the gathered per-sample values of the whole split (default none)."""
        return {}

    def reports(self, sums: dict[str, np.ndarray]) -> dict[str, Any]:
        """Non-scalar results of an evaluation, written to the run directory (name -> JSON-able)."""
        return {}

    def eval_histograms(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-sample values to histogram over the evaluated split (never gathered: see HistogramCollector)."""
        return {}

    def histogram_reports(self, histograms: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Reports made of the split's histograms of :meth:`eval_histograms` (name -> JSON-able)."""
        return {}

    def predictions(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-sample rows for ``dtrain eval --predictions`` (default: the raw outputs)."""
        return {"outputs": outputs}

    def metric_names(self) -> list[str] | None:
        """Names an evaluation reports (without the split prefix), or None when only data can tell."""
        return None


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
        for part in all_gather_objects({k: [v.min(), v.max(), v.sum(), np.square(v).sum()] for k, v in local.items() if len(v)}):
            for key, (low, high, total, squares) in part.items():
                seen = extremes.setdefault(key, [low, high, 0.0, 0.0])
                seen[:] = [min(seen[0], low), max(seen[1], high), seen[2] + total, seen[3] + squares]
        edges = {k: _histogram_edges(low, high, self.bins) for k, (low, high, _, _) in extremes.items()}
        counts = {k: np.histogram(local.get(k, np.zeros(0)), bins=e)[0].astype(np.float64) for k, e in edges.items()}
        totals = add_sums(all_gather_objects(counts))
        return {
            k: {"edges": e.tolist(), "counts": totals[k].astype(np.int64).tolist(), "sum": float(extremes[k][2]),
                "sum_squares": float(extremes[k][3])}
            for k, e in edges.items()
        }


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _histogram_edges(low: float, high: float, bins: int) -> np.ndarray:
    """np.histogram's own edges for values from ``low`` to ``high`` (a unit wide range when they are equal)."""
    if low == high:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, bins + 1)
