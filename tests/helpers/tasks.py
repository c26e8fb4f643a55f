"""Custom tasks and models used by the task tests (imported by workers by module path)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class AbsErrorTask:
    """Regresses ``energies`` / 1000 with an L1 loss; reports mean absolute error and a hit rate."""

    output_width = 1

    def __init__(self, scale: float = 1000.0, tolerance: float = 50.0) -> None:
        self.scale, self.tolerance = scale, tolerance

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.l1_loss(outputs[:, 0].float(), batch["energies"].reshape(-1) / self.scale, reduction="sum")

    def metrics(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | int]:
        err = (outputs[:, 0].float() * self.scale - batch["energies"].reshape(-1)).abs()
        return {"count": err.numel(), "abs_err": err.sum(), "hits": (err <= self.tolerance).sum()}

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1.0)
        return {"mae": sums["abs_err"] / n, "hit_rate": sums["hits"] / n}


class NoCountTask(AbsErrorTask):
    def metrics(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | int]:
        return {"abs_err": (outputs[:, 0] - batch["energies"].reshape(-1)).abs().sum()}


class VectorMetricTask(AbsErrorTask):
    def metrics(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | int]:
        return {"count": outputs.shape[0], "abs_err": (outputs[:, 0] - batch["energies"].reshape(-1)).abs()}


class BrokenLossTask(AbsErrorTask):
    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs[:, 0] + batch["no_such_key"]


class NoMetricsTask:
    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs.sum()


class HKResNetLike(nn.Module):
    """Written like the water-Cherenkov tutorial's CNNs: channels-first (38, 16, 40) input, explicit channels."""

    def __init__(self, num_input_channels: int = 38, num_classes: int = 3) -> None:
        super().__init__()
        self.num_input_channels = num_input_channels
        self.conv = nn.Conv2d(num_input_channels, 8, kernel_size=3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.num_input_channels:
            raise ValueError(f"expected {self.num_input_channels} channels first, got shape {tuple(x.shape)}")
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def hk_cnn(pretrained: bool = False, **kwargs: int) -> nn.Module:
    """The tutorial's factory style: ``resnet18(pretrained=False, **kwargs)``."""
    return HKResNetLike(**kwargs)


class EnergyAwareMLP(nn.Module):
    """Takes the event energy as a second input (``data.input_keys = ["energies"]``)."""

    def __init__(self, num_classes: int, in_features: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 8), nn.ReLU())
        self.head = nn.Linear(9, num_classes)

    def forward(self, x: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        if energies.shape != (x.shape[0], 1):
            raise ValueError(f"energies must be (batch, 1), got {tuple(energies.shape)}")
        return self.head(torch.cat((self.body(x), energies.float() / 1000.0), dim=1))


class TwoHeadMLP(nn.Module):
    """A multi-head model whose second head the task's loss never uses (DDP's find_unused_parameters)."""

    def __init__(self, num_classes: int, in_features: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 8), nn.ReLU())
        self.head = nn.Linear(8, num_classes)
        self.aux_head = nn.Linear(8, 2)  # trained by other tasks; unused here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class QuantileTask(AbsErrorTask):
    """AbsErrorTask with exact quantiles of the absolute error, from the gathered per-sample values."""

    def eval_samples(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"abs_err": (outputs[:, 0].float() * self.scale - batch["energies"].reshape(-1)).abs()}

    def finalize_samples(self, samples: dict[str, np.ndarray]) -> dict[str, float]:
        values = samples.get("abs_err", np.zeros(0))
        if not len(values):
            return {}
        return {"abs_err_median": float(np.quantile(values, 0.5)), "abs_err_90": float(np.quantile(values, 0.9))}


class SamplesWithoutFinalizeTask(AbsErrorTask):
    def eval_samples(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"abs_err": outputs[:, 0]}
