"""Models used only by tests, loaded by workers through the "package.module:ClassName" model path."""

from __future__ import annotations

import os
import signal
import time
import warnings

import torch
from torch import nn


class SlowMLP(nn.Module):
    """A small MLP whose forward sleeps, so real-time tests can land signals mid-epoch."""

    def __init__(self, num_classes: int, in_features: int, delay: float = 0.02) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 16), nn.ReLU(), nn.Linear(16, num_classes))
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.delay:
            time.sleep(self.delay)
        return self.net(x)


class FaultyMLP(nn.Module):
    """Fails on one rank after some training forwards: raises, kills itself, or hangs."""

    def __init__(self, num_classes: int, in_features: int, rank: int = 1, after: int = 3, mode: str = "raise") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
        self.fail_rank, self.after, self.mode = rank, after, mode
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if int(os.environ.get("RANK", "0")) == self.fail_rank and self.calls > self.after:
                if self.mode == "raise":
                    raise RuntimeError(f"injected failure on rank {self.fail_rank} at forward {self.calls}")
                if self.mode == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if self.mode == "hang":
                    time.sleep(3600)
        return self.net(x)


class RaisingMLP(nn.Module):
    """Raises ``RuntimeError(message)`` in its forward on one rank (-1: every rank) from forward call ``after + 1``
    on; the worker's dry forward pass is call 1."""

    def __init__(self, num_classes: int, in_features: int, rank: int = -1, after: int = 0, message: str = "boom") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
        self.fail_rank, self.after, self.message = rank, after, message
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_rank in (-1, int(os.environ.get("RANK", "0"))) and self.calls > self.after:
            raise RuntimeError(self.message)
        return self.net(x)


class WarningMLP(nn.Module):
    """Issues a Python warning when built, as libraries do (deprecations, numerical notes)."""

    def __init__(self, num_classes: int, in_features: int) -> None:
        super().__init__()
        warnings.warn("WarningMLP: a note the run's logs must keep", UserWarning, stacklevel=2)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BNConvNet(nn.Module):
    """A small CNN with BatchNorm (2-D after each conv, 1-D before the head): the norm layers with
    running statistics that mixed precision under FSDP must keep in fp32."""

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int, channels: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(sample_shape[0], channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(channels, channels), nn.BatchNorm1d(channels), nn.ReLU(), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SlowResNet18(nn.Module):
    """torchvision's ResNet-18 with the small-input stem (3x3 stride-1 conv, no max-pool) and a sleep per
    training forward: the physicists' BatchNorm model, slow enough for a signal to land mid-epoch on a GPU."""

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int, delay: float = 0.02) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.net = resnet18(num_classes=num_classes)
        self.net.conv1 = nn.Conv2d(sample_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.net.maxpool = nn.Identity()  # type: ignore[assignment]
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.delay:
            time.sleep(self.delay)
        return self.net(x)


class MaskedCloudMean(nn.Module):
    """Point clouds (C, n_points) with ``n_hits`` (data.input_keys): the mean over each cloud's real
    hits, then a linear layer. Refuses counts that are no hit counts of these clouds."""

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(sample_shape[0], num_classes)

    def forward(self, x: torch.Tensor, n_hits: torch.Tensor) -> torch.Tensor:
        if n_hits.dtype != torch.int64 or n_hits.shape != x.shape[:1] or bool((n_hits > x.shape[2]).any()):
            raise ValueError(f"n_hits {n_hits} is not one hit count per cloud of {x.shape[2]} points")
        real = (torch.arange(x.shape[2], device=x.device)[None, :] < n_hits[:, None]).to(x.dtype)
        pooled = (x * real[:, None, :]).sum(2) / n_hits.clamp(min=1).to(x.dtype)[:, None]
        return self.head(pooled)
