"""One process whose default process group has no CPU backend, as on a GPU node (NCCL only).

``python -m tests.helpers.dcp_group_worker OUT_DIR BACKEND [async|sync]``: initialises the default
group with ``BACKEND`` (``cuda:gloo`` on a CPU-only torch has no CPU device type, like NCCL), saves a
model and optimizer through the FSDP checkpoint store, loads them back into a fresh model through the
store's group and prints ``RESTORED <max abs difference>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dist_train.checkpoint.store import build_checkpoint_store, open_checkpoint
from dist_train.config import FSDPConfig
from dist_train.distributed.comm import DistInfo
from dist_train.distributed.strategy import FSDPStrategy


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def main(out: Path, backend: str, mode: str) -> None:
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    cpu = torch.device("cpu")
    info = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=cpu)
    strategy = FSDPStrategy(FSDPConfig(), None, cpu, 1)
    store = build_checkpoint_store(
        directory=out,
        strategy=strategy,
        dist_info=info,
        keep_last=2,
        async_save=mode == "async",
        barrier_timeout=60.0,
        control_group=None,
    )
    model, optimizer = _model_and_optimizer(0)
    common = {"config": {}, "epoch_complete": True, "world_size": 1}
    path = store.save(model, optimizer, common, {"rng": 1}, epoch=1, step=1, metrics={}, is_best=False, blocking=True)
    store.close()
    assert path is not None
    fresh, fresh_optimizer = _model_and_optimizer(1)
    open_checkpoint(path).restore_model_and_optimizer(fresh, fresh_optimizer, strategy, group=store.group)
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
    print(f"RESTORED {diff}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "async")
