"""Evaluation of a model on a split: the exact sum/count reduction shared by training and `dtrain eval`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dist_train.metrics import SumMeter


@dataclass
class Predictions:
    """What physics users analyse after training: one row per evaluated event."""

    indices: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    softmax: list[np.ndarray] = field(default_factory=list)

    def add(self, rows: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> None:
        self.indices.append(rows.cpu().numpy())
        self.labels.append(labels.cpu().numpy())
        self.softmax.append(torch.softmax(logits.float(), dim=1).cpu().numpy())

    def save(self, path: Path) -> None:
        softmax = np.concatenate(self.softmax) if self.softmax else np.zeros((0, 0), np.float32)
        np.savez(
            path,
            indices=np.concatenate(self.indices) if self.indices else np.zeros(0, np.int64),
            labels=np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64),
            softmax=softmax,
            predictions=softmax.argmax(axis=1) if softmax.size else np.zeros(0, np.int64),
        )


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    prefix: str,
    limit: int | None = None,
    predictions: Predictions | None = None,
) -> dict[str, float]:
    """Mean loss and accuracy over every sample of every rank's shard (a collective)."""
    was_training = model.training
    model.eval()
    meter = SumMeter(device)
    try:
        for i, batch in enumerate(batches):
            if limit is not None and i >= limit:
                break
            x = batch["x"].to(device, non_blocking=device.type == "cuda")
            y = batch["y"].to(device, non_blocking=device.type == "cuda")
            with autocast():
                logits = model(x)
            meter.update(logits, y, F.cross_entropy(logits.float(), y, reduction="sum"))
            if predictions is not None:
                predictions.add(batch["index"], batch["y"], logits)
    finally:
        model.train(was_training)
    return meter.reduce(prefix)
