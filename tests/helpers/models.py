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

    def __init__(
        self, num_classes: int, in_features: int, rank: int = -1, after: int = 0, message: str = "boom"
    ) -> None:
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

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int, channels: int = 8, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay  # seconds of sleep per training forward: lets a signal land mid-run
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
        self.head = nn.Sequential(
            nn.Linear(channels, channels), nn.BatchNorm1d(channels), nn.ReLU(), nn.Linear(channels, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.delay:
            time.sleep(self.delay)
        return self.head(self.features(x))


class TinyBNConvNet(nn.Module):
    """One conv, BatchNorm2d, pooling and a linear head: for tests whose answer depends on the running
    statistics (buffers) and that want the smallest such model."""

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


class StopSignalMLP(nn.Module):
    """Sends the launcher a stop signal from rank 0 at a chosen point, as a user or scheduler would.

    The point comes from the environment (not the config, so that the relaunch that resumes has the
    same config and no signal): ``STOP_SIGNAL_AT="N"`` sends it at rank 0's training forward of
    optimizer step N (1-based, grad_accum 1; the start-up passes, the dry check and DDP's bucket pass
    on two zero samples, do not count); ``"N:eval:K"`` at the (K+1)-th evaluation forward after
    that step instead. ``STOP_SIGNAL_NAME``: SIGTERM (default), SIGINT (Ctrl-C), SIGUSR1... The
    forward then waits until rank 0's log says the worker received the stop, so the request
    arrives at exactly this point of the run.
    """

    def __init__(self, num_classes: int, in_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 16), nn.ReLU(), nn.Linear(16, num_classes))
        at, _, eval_skip = os.environ.get("STOP_SIGNAL_AT", "0").partition(":eval:")
        self.at, self.in_eval, self.eval_skip = int(at), bool(eval_skip), int(eval_skip or 0)
        self.signal_name = os.environ.get("STOP_SIGNAL_NAME", "SIGTERM")
        self.train_calls = self.eval_calls = 0
        self.sent = not self.at or int(os.environ.get("RANK", "0")) != 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            start_up = not torch.is_grad_enabled() or x.device.type == "meta" or (x.shape[0] == 2 and not x.any())
            self.train_calls += 0 if start_up else 1
        elif self.train_calls >= self.at:
            self.eval_calls += 1
        due = self.eval_calls == self.eval_skip + 1 if self.in_eval else self.train_calls == self.at
        if due and not self.sent:
            self.sent = True
            self._signal_launcher_and_wait()
        return self.net(x)

    def _signal_launcher_and_wait(self) -> None:
        import psutil

        launcher = next(p for p in psutil.Process().parents() if "launcher.cli" in " ".join(p.cmdline()))
        launcher.send_signal(getattr(signal, self.signal_name))
        log = os.path.join(os.environ["DTRAIN_RUN_DIR"], "logs", "rank0.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(log, encoding="utf-8") as f:
                if "received SIG" in f.read():
                    return
            time.sleep(0.02)
        raise RuntimeError("the stop signal did not reach rank 0 within 60 s")


class BatchNormMLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear: running statistics each rank updates with its own batches."""

    def __init__(self, num_classes: int, in_features: int, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
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


class BranchingMLP(nn.Module):
    """Branches on a tensor's value in its forward: fine eagerly and for torch.compile with graph breaks,
    an error under ``train.compile_fullgraph`` (data-dependent control flow cannot be one graph)."""

    def __init__(self, num_classes: int, in_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if out.abs().sum() > 1e30:  # never true: only the branch itself matters
            out = out / 2
        return out


class ResidualBlock(nn.Module):
    """x + Linear(ReLU(Linear(x))): a block of the model's own class, what FSDP shards (and compiles) as a unit."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.outer = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(torch.relu(self.inner(x)))


class ResidualMLP(nn.Module):
    """Flatten, a linear stem, ``blocks`` ResidualBlocks, a linear head."""

    def __init__(self, num_classes: int, in_features: int, width: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width))
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(blocks)))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
