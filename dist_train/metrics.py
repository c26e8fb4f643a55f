"""Throughput and memory measurements of the training loop, reduced across ranks.

The task metrics (loss, accuracy, regression errors) are sums and counts kept by
:class:`dist_train.tasks.base.MetricSums`; this module times the epoch and reads memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from dist_train.distributed.comm import all_reduce_max, all_reduce_sums


@dataclass
class StepTimer:
    """Splits wall time into waiting for the loader and computing, for the data-wait fraction."""

    data_wait: float = 0.0
    total: float = 0.0
    samples: int = 0
    _t0: float = field(default_factory=time.perf_counter)
    _mark: float = field(default_factory=time.perf_counter)

    def start(self) -> None:
        self.data_wait = self.total = 0.0
        self.samples = 0
        self._t0 = self._mark = time.perf_counter()

    def fetching(self) -> None:
        """Called right before asking the loader for a batch: the wait starts now."""
        self._mark = time.perf_counter()

    def batch_arrived(self) -> None:
        now = time.perf_counter()
        self.data_wait += now - self._mark
        self._mark = now

    def step_done(self, samples: int) -> None:
        self.samples += samples

    def reduce(self, prefix: str) -> dict[str, float]:
        """Throughput from global samples over the slowest rank's time (ranks run in lock-step)."""
        self.total = time.perf_counter() - self._t0
        sums = all_reduce_sums({"samples": float(self.samples), "wait": self.data_wait, "time": self.total})
        slowest = all_reduce_max({"time": self.total})["time"]
        return {
            f"{prefix}/samples_per_s": sums["samples"] / max(slowest, 1e-9),
            f"{prefix}/data_wait_frac": sums["wait"] / max(sums["time"], 1e-9),
            f"{prefix}/epoch_time_s": slowest,
        }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        # ru_maxrss is KiB on Linux: the peak resident set of this process.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return 0.0


def rss_anon_mb() -> float | None:
    """This process's own (anonymous) resident memory: without the pages of memory-mapped files.

    A memory-mapped HDF5 file's pages count in the resident set (``peak_memory_mb`` on the CPU) as
    they are read, but they are the kernel's page cache, shared and dropped under pressure; this is
    the memory that grows only if something is really kept. Linux only (None elsewhere).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def _tensors_bytes(tensors: Iterable[object]) -> int:
    """Bytes this rank holds of ``tensors``: a DTensor's (FSDP2's) own shard, any other tensor whole."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 has no public DTensor, and no FSDP2 strategy in dtrain either
        DTensor = ()  # type: ignore[assignment,misc]  # noqa: N806
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            held = t.to_local() if isinstance(t, DTensor) else t
            total += held.numel() * held.element_size()
    return total


def training_state_mb(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """This rank's share of what training keeps between steps: parameters, gradients, optimizer state (MiB).

    Call it after the optimizer's step and before ``zero_grad``: gradients and the optimizer's
    state (Adam's moments) exist then. Under DDP every rank holds all of it; under FSDP each rank
    holds its shards, about 1/world of each. Communication buffers (DDP's gradient buckets, FSDP's
    all-gathered units) and activations are not state: they show in the peak memory instead.
    """
    params = list(model.parameters())
    optimizer_tensors = (v for per_param in optimizer.state.values() for v in per_param.values())
    state = {
        "memory/params_mb": _tensors_bytes(params) / 2**20,
        "memory/grads_mb": _tensors_bytes(p.grad for p in params) / 2**20,
        "memory/optimizer_mb": _tensors_bytes(optimizer_tensors) / 2**20,
    }
    state["memory/state_mb"] = sum(state.values())
    return state
