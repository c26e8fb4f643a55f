"""Models used only by tests, loaded by workers through the "package.module:ClassName" model path."""

from __future__ import annotations

import os
import signal
import time

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


class BatchNormMLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear: running statistics each rank updates with its own batches."""

    def __init__(self, num_classes: int, in_features: int, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BatchNormCNN(nn.Module):
    """Two (conv 3x3 -> BatchNorm2d -> ReLU) blocks, global average pooling, a linear head: a ResNet in miniature."""

    def __init__(self, num_classes: int, in_channels: int, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class RunningMeanMLP(nn.Module):
    """Subtracts a running mean of its inputs that the training forward updates and reads (an input normaliser
    of the kind physics models carry), then Linear -> BatchNorm1d -> ReLU -> Linear. Under FSDP, which leaves
    buffers to each rank, every rank's mean evolves with its own batches and shapes its own gradients."""

    def __init__(self, num_classes: int, in_features: int, momentum: float = 0.2) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("input_mean", torch.zeros(in_features))
        self.net = nn.Sequential(nn.Linear(in_features, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        if self.training:
            with torch.no_grad():
                self.input_mean.lerp_(x.mean(0), self.momentum)
        return self.net(x - self.input_mean)
