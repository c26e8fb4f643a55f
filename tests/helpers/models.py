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
