"""A complete custom task, as documented in docs/tasks.md: copy it into your own module to start.

``RelativeEnergyTask`` regresses the event energy with a loss on the *relative* error (a Huber
loss of (pred - true) / true, as physicists use for energies spanning orders of magnitude) and
reports the fraction of events within a tolerance. Use it with::

    [task]
    name = "dist_train.tasks.examples:RelativeEnergyTask"
    targets = ["energies"]
    kwargs = { scale = 1000.0, tolerance = 0.1 }
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RelativeEnergyTask:
    # The model's output width; dtrain passes it to the model as num_classes and checks it at start-up.
    output_width = 1

    def __init__(self, scale: float = 1000.0, tolerance: float = 0.1, delta: float = 0.1) -> None:
        self.scale = scale  # the network predicts energy / scale: outputs of order 1
        self.tolerance = tolerance
        self.delta = delta

    def _relative_error(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        true = batch["energies"].reshape(-1).float()
        return (outputs[:, 0].float() * self.scale - true) / true

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rel = self._relative_error(outputs, batch)
        # A SUM over the batch's samples: dtrain divides by the global sample count of the step.
        return F.huber_loss(rel, torch.zeros_like(rel), delta=self.delta, reduction="sum")

    def metrics(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | int]:
        rel = self._relative_error(outputs, batch)
        # Per-batch SUMS and the sample count: dtrain adds them over batches and ranks, exactly.
        return {
            "count": rel.numel(),
            "within": (rel.abs() <= self.tolerance).sum(),
            "abs_rel": rel.abs().sum(),
            "rel": rel.sum(),
            "rel_sq": rel.square().sum(),
        }

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        # Called once on the totals of the whole split (sums["loss"] is the loss sum dtrain adds).
        n = max(sums["count"], 1.0)
        bias = sums["rel"] / n
        return {
            "loss": sums["loss"] / n,
            "within_tolerance": sums["within"] / n,
            "mean_abs_rel_error": sums["abs_rel"] / n,
            "resolution": max(sums["rel_sq"] / n - bias * bias, 0.0) ** 0.5,
        }

    def predictions(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Rows for `dtrain eval --predictions out.npz` (dtrain adds the file indices).
        return {"energy_pred": outputs[:, 0].float() * self.scale, "energy_true": batch["energies"].reshape(-1)}
