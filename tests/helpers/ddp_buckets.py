"""Run by torchrun (gloo, CPU) from tests/test_ddp_buckets.py: DDP's gradient buckets before and after
``settle_gradient_buckets``. Rank 0 writes what it found as JSON to the path given as argv[1].

Every DDP here wraps a copy of the same module and reduces the same per-rank batch, so any
difference between their reduced gradients comes from the bucket layout alone.
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_train.distributed.comm import settle_gradient_buckets


def reduced_grads(ddp: DDP, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    ddp.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(ddp(x), y).backward()
    return [p.grad.clone() for p in ddp.module.parameters()]  # type: ignore[union-attr]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    # BatchNorm (buffers) and Dropout (random stream): what settling must leave untouched.
    base = nn.Sequential(
        nn.Flatten(), nn.Linear(72, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)
    )
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(8, 72, generator=g), torch.randint(0, 3, (8,), generator=g)

    default = DDP(copy.deepcopy(base))
    torch.manual_seed(1)
    first_default = reduced_grads(default, x, y)  # DDP's initial layout: one bucket in registration order
    torch.manual_seed(1)
    reduced_grads(default, x, y)  # the forward of this second iteration rebuilds in gradient-ready order
    torch.manual_seed(1)
    rebuilt_default = reduced_grads(default, x, y)

    settled_model = copy.deepcopy(base)
    settled = DDP(settled_model)
    buffers_before = [b.clone() for b in settled_model.buffers()]
    torch.manual_seed(1)
    rng_before = torch.get_rng_state()
    settled_model.eval()
    settle_gradient_buckets(settled, torch.zeros(2, 72))
    report: dict[str, Any] = {
        "rng_unchanged": torch.equal(rng_before, torch.get_rng_state()),
        "buffers_unchanged": all(
            torch.equal(a, b) for a, b in zip(buffers_before, settled_model.buffers(), strict=True)
        ),
        "grads_dropped": all(p.grad is None for p in settled_model.parameters()),
        "mode_restored": not settled_model.training,
    }
    settled_model.train()
    first_settled = reduced_grads(settled, x, y)
    report["rebuilt_at_first_step"] = settled._has_rebuilt_buckets  # DDP sets it when its forward rebuilds
    report["first_step_like_default_rebuilt"] = same(first_settled, rebuilt_default)
    report["default_first_step_like_its_rebuilt"] = same(first_default, rebuilt_default)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
