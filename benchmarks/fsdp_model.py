"""The model of benchmarks/fsdp.py: a stack of pre-norm residual MLP blocks (a transformer without attention).

Importable as a dtrain ``[model] name = "fsdp_model:BlockStack"`` (benchmarks/ on PYTHONPATH) and by the
peers' workers, so every contender trains the same network. Each ``Block`` holds ``8 * width**2``
parameters: the unit FSDP shards (``[fsdp] wrap = ["Block"]``, the peers' transformer-layer policy).
width 1024, depth 12: 101.5M parameters with 784 inputs and 10 classes.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class BlockStack(nn.Module):
    def __init__(self, sample_shape: tuple[int, ...], num_classes: int, width: int = 1024, depth: int = 12) -> None:
        super().__init__()
        self.embed = nn.Linear(math.prod(sample_shape), width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.flatten(1))
        for block in self.blocks:
            x = block(x)
        return self.head(x)
