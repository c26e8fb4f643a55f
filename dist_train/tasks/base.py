"""What every task shares: the interface the trainer calls (the metric sums are in dist_train.metrics).

A task owns the loss, the metrics and the predictions; the loop, samplers, AMP, checkpoints and
preemption are the same for all tasks. Metrics are *sums* (and a ``count``) per batch, added up
on the device in float64, combined across ranks by addition and turned into means only once, on
the totals (``finalize``): never a mean of per-rank means. Quantiles cannot come from sums, so a
task may also return per-sample values during evaluation (``eval_samples``); they are gathered
from every rank (each sample exactly once) and reduced with numpy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from dist_train.metrics import DeferredSums, Sums

Batch = Mapping[str, torch.Tensor]


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
