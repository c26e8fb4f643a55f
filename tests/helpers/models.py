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
