"""Your own model for dtrain: a module with a class (or a function) that returns a torch.nn.Module.

configs/custom_model.toml trains it with `[model] name = "my_models:EventCNN"`.
"""

import torch
from torch import nn


class EventCNN(nn.Module):
    """Two conv blocks and a linear head over (C, H, W) events.

    dtrain fills in `sample_shape` (one sample's shape, e.g. (16, 40, 38)) and `num_classes`
    because the constructor names them; `channels` and `dropout` come from [model].
    """

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int, channels: int = 16, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(sample_shape[0], channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
