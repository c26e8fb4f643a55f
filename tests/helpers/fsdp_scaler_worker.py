"""Run by torchrun (2 gloo ranks): fp16's loss scaler of the FSDP strategy when only one rank's shard
of the gradients overflows. Prints one ``SCALER rank=<r> skipped=<bool> scale=<float> finite_step=<bool>``
line per rank; every warning is an error."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from dist_train.config import FSDPConfig
from dist_train.distributed.strategy import FSDPStrategy


def main() -> None:
    warnings.simplefilter("error")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cpu = torch.device("cpu")
    strategy = FSDPStrategy(FSDPConfig(min_params=10), None, cpu, dist.get_world_size())
    torch.manual_seed(0)
    model = strategy.wrap(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = strategy.grad_scaler(enabled=True)
    scaler._init_scale = 4.0  # small scale: a finite step stays finite
    results = []
    for overflow in (True, False):
        scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        if overflow and rank == 1:  # an inf in rank 1's shard only: rank 0 sees finite gradients
            next(model.parameters()).grad.to_local().view(-1)[0] = float("inf")  # type: ignore[union-attr]
        before = [p.detach().to_local().clone() for p in model.parameters()]  # type: ignore[operator]
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        changed = any(
            not torch.equal(b, p.detach().to_local()) for b, p in zip(before, model.parameters(), strict=True)
        )  # type: ignore[operator]
        results.append((changed, scaler.get_scale()))
    (first_changed, first_scale), (second_changed, _) = results
    print(
        f"SCALER rank={rank} skipped={not first_changed} scale={first_scale} finite_step={second_changed}", flush=True
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
