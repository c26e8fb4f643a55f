"""A tiny CNN with BatchNorm, for tests whose answer depends on the running statistics (buffers)."""

from __future__ import annotations

import torch
from torch import nn


class BNConvNet(nn.Module):
    def __init__(self, sample_shape: tuple[int, ...], num_classes: int, channels: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(sample_shape[0], channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
