"""What every task shares: the interface the trainer calls and the exact metric sums.

A task owns the loss, the metrics and the predictions; the loop, samplers, AMP, checkpoints and
preemption are the same for all tasks. Metrics are *sums* (and a ``count``) per batch, added up
on the device in float64, combined across ranks by addition and turned into means only once, on
the totals (``finalize``): never a mean of per-rank means. Quantiles cannot come from sums, so a
task may also return per-sample values during evaluation (``eval_samples``); they are gathered
from every rank (each sample exactly once) and reduced with numpy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dist_train.distributed import all_gather_objects

Batch = Mapping[str, torch.Tensor]
# Per-batch metric sums: tensors on the device (any shape, e.g. a confusion matrix) or host numbers.
Sums = dict[str, torch.Tensor | float | int]


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

    def loss(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """The loss SUMMED over the batch's samples (dtrain divides by the global sample count)."""
        raise NotImplementedError

    def metrics(self, outputs: Any, batch: Batch) -> Sums:
        """Per-batch sums for training; must include ``count`` (samples in the batch)."""
        raise NotImplementedError

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
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        self._numbers: dict[str, float] = {}

    def add(self, values: Sums) -> None:
        for key, value in values.items():
            acc = self._tensors.get(key)
            if acc is not None:
                acc += value.detach() if isinstance(value, torch.Tensor) else value
            elif isinstance(value, torch.Tensor):
                # float64: sums of many float32 values stay exact enough to match a 1-process run at 1e-6.
                self._tensors[key] = value.detach().to(torch.float64, copy=True)
            else:  # host numbers (sample counts) stay on the host: no device op per step
                self._numbers[key] = self._numbers.get(key, 0.0) + float(value)

    def local_sums(self) -> dict[str, np.ndarray]:
        """This rank's sums on the host (picklable; what a checkpoint stores for a partial epoch)."""
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
