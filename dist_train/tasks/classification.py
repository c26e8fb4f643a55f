"""Classification: cross-entropy on integer labels, accuracy, per-class recall, confusion matrix.

This is the default task and reproduces dtrain's original loop exactly (same metric names and
values): ``cross_entropy(logits.float(), y, reduction="sum")`` per batch, ``accuracy`` from the
arg-max. Evaluation adds the confusion matrix (rows: true class, columns: predicted class) and
each class's recall.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dist_train.metrics import Sums
from dist_train.tasks.base import Batch, Task


class ClassificationTask(Task):
    name = "classification"

    def __init__(
        self,
        num_classes: int,
        label_key: str,
        *,
        label_smoothing: float = 0.0,
        class_weights: list[float] | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.output_width = num_classes
        self.label_key = label_key
        self.batch_keys = ()  # labels arrive as batch["y"] (read once per split, not per batch)
        self.label_smoothing = label_smoothing
        self._weights_list = class_weights
        self._weights: torch.Tensor | None = None

    def _class_weights(self, device: torch.device) -> torch.Tensor | None:
        if self._weights_list is None:
            return None
        if self._weights is None or self._weights.device != device:
            self._weights = torch.tensor(self._weights_list, dtype=torch.float32, device=device)
        return self._weights

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(
            outputs.float(),
            batch["y"],
            weight=self._class_weights(outputs.device),
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )

    def metrics(self, outputs: torch.Tensor, batch: Batch) -> Sums:
        y = batch["y"]
        return {"correct": (outputs.detach().argmax(1) == y).sum(), "count": int(y.shape[0])}

    def eval_metrics(self, outputs: torch.Tensor, batch: Batch) -> Sums:
        y = batch["y"]
        k = self.num_classes
        predicted = outputs.detach().argmax(1)
        confusion = torch.bincount(y * k + predicted, minlength=k * k).reshape(k, k)
        return {"correct": (predicted == y).sum(), "count": int(y.shape[0]), "confusion": confusion}

    def finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        n = max(float(sums["count"]), 1.0)
        out = {"loss": float(sums["loss"]) / n, "accuracy": float(sums["correct"]) / n, "samples": float(sums["count"])}
        if "confusion" in sums:
            confusion = np.asarray(sums["confusion"])
            per_class = confusion.sum(axis=1)
            for c in range(self.num_classes):
                if per_class[c] > 0:  # a class absent from the split has no recall
                    out[f"recall/{c}"] = float(confusion[c, c] / per_class[c])
        return out

    def metric_names(self) -> list[str]:
        return ["loss", "accuracy", "samples", *(f"recall/{c}" for c in range(self.num_classes))]

    def reports(self, sums: dict[str, np.ndarray]) -> dict[str, Any]:
        if "confusion" not in sums:
            return {}
        confusion = np.asarray(sums["confusion"]).astype(np.int64)
        return {"confusion": {"rows": "true class", "columns": "predicted class", "matrix": confusion.tolist()}}

    def predictions(self, outputs: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        softmax = torch.softmax(outputs.float(), dim=1)
        return {"labels": batch["y"], "softmax": softmax, "predictions": softmax.argmax(1)}


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> list[float]:
    """``n / (k * n_c)`` per class from the training labels (sklearn's "balanced"); 0 for absent classes."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    total = counts.sum()
    return [float(total / (num_classes * c)) if c > 0 else 0.0 for c in counts]
