"""Evaluation of a model on a split: the exact sum/count reduction shared by training and `dtrain eval`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dist_train.data.device_feed import batch_to_device
from dist_train.metrics import HistogramCollector
from dist_train.tasks import MetricSums, SampleCollector, Task

#: Buckets of each evaluation histogram (regression's residuals).
HISTOGRAM_BINS = 50


def forward(model: nn.Module, batch: Mapping[str, torch.Tensor], input_keys: Sequence[str]) -> Any:
    """``model(x, **{key: batch[key] for key in data.input_keys})``."""
    if not input_keys:
        return model(batch["x"])
    return model(batch["x"], **{k: batch[k] for k in input_keys})


@dataclass
class Predictions:
    """What physics users analyse after training: one row per evaluated event (the task decides the columns)."""

    columns: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, rows: torch.Tensor, values: Mapping[str, torch.Tensor]) -> None:
        self.columns.setdefault("indices", []).append(rows.cpu().numpy())
        for key, value in values.items():
            self.columns.setdefault(key, []).append(value.detach().cpu().numpy())

    def save(self, path: Path) -> None:
        arrays = {k: np.concatenate(v) for k, v in self.columns.items()}
        arrays.setdefault("indices", np.zeros(0, np.int64))
        np.savez(path, **arrays)  # type: ignore[arg-type]


@dataclass
class EvalResult:
    metrics: dict[str, float]
    # Non-scalar results (a confusion matrix), JSON-able; the same on every rank.
    reports: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    task: Task,
    *,
    input_keys: Sequence[str] = (),
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    prefix: str,
    limit: int | None = None,
    predictions: Predictions | None = None,
    to_device: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> EvalResult:
    """The task's metrics over every sample of every rank's shard (a collective: all ranks call it).

    ``to_device``: the loader's :class:`~dist_train.data.device_feed.DeviceFeed` (default: plain copies)."""
    was_training = model.training
    model.eval()
    sums = MetricSums(device)
    samples = SampleCollector()
    histograms = HistogramCollector(HISTOGRAM_BINS)
    try:
        for i, batch in enumerate(batches):
            if limit is not None and i >= limit:
                break
            on_device = to_device(batch) if to_device is not None else batch_to_device(batch, device)
            with autocast():
                outputs = forward(model, on_device, input_keys)
            sums.add({"loss": task.loss(outputs, on_device).detach()})
            sums.add(task.eval_metrics(outputs, on_device))
            samples.add(task.eval_samples(outputs, on_device))
            if task.has_histograms:
                histograms.add(task.eval_histograms(outputs, on_device))
            if predictions is not None:
                predictions.add(batch["index"], task.predictions(outputs, on_device))
    finally:
        model.train(was_training)
    totals = sums.reduce()
    metrics = task.finalize(totals)
    metrics.update(task.finalize_samples(samples.gather()))
    reports = task.reports(totals)
    if task.has_histograms:  # the same on every rank: all ranks reduce, or none
        reports.update(task.histogram_reports(histograms.reduce()))
    return EvalResult({f"{prefix}/{k}": v for k, v in metrics.items()}, reports)
