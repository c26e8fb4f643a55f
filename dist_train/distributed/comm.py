"""Process-group setup and the small rank helpers everything else uses.

One process without torchrun's variables is a world of size 1 with no process group at all, so
`--debug` and a plain `python -m dist_train cfg.toml` run exactly the same code as a 2-rank job.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_leaves

from dist_train import envvars


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def choose_device(local_rank: int) -> torch.device:
    """Each rank takes the GPU at its LOCAL_RANK; CPU when CUDA is absent or the launcher asked for it.

    Debug mode is no exception: the launcher gives its one process one reserved GPU, or asks for the CPU.
    """
    if envvars.get(envvars.DEVICE) == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def split_cpu_threads(local_world_size: int) -> None:
    """CPU ranks on one node share its cores; oversubscription makes every rank slower than one."""
    if os.environ.get("OMP_NUM_THREADS"):
        return  # the user (or torchrun) decided
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, local_world_size)))


def init_distributed(pg_timeout_s: float = 600.0) -> DistInfo:
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    device = choose_device(local_rank)
    if device.type == "cpu":
        split_cpu_threads(local_world)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # A bounded timeout: a dead rank must end the job in minutes, not NCCL's default 30.
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world, device=device)


def settle_gradient_buckets(
    ddp: Any, example_input: torch.Tensor, example_kwargs: dict[str, torch.Tensor] | None = None
) -> None:
    """One forward/backward of ``ddp`` on ``example_input`` (and keyword inputs) before training, undone afterwards, so
    that every process of a run (fresh or resumed) reduces every training step with the same
    gradient bucket layout.

    DDP starts with one bucket holding all parameters in registration order and, at the first
    forward after the first synchronised backward, rebuilds its buckets in the order gradients
    became ready. The layout decides where each gradient element sits in the all-reduce buffer,
    and from three ranks on its position can change the order in which the ranks' values are summed
    (float addition is not associative; on gloo the same gradients reduced in the two layouts differ
    in the last bits). Without this, a process resumed at step N reduces step N with the initial
    layout where the uninterrupted run used the rebuilt one, and the weights differ from then on. After this backward
    the rebuild happens at the first training step everywhere, in the layout DDP would choose anyway
    (gradient-ready order, which overlaps the all-reduce with the backward pass), so steps cost the
    same; the one extra all-reduce happens here, at start-up.

    Nothing of the run changes: buffers (BatchNorm statistics) and random streams are restored and
    the gradients dropped. Runs in train mode, so the graph is the training graph.
    """
    module = ddp.module
    was_training = module.training
    saved_buffers = [b.detach().clone() for b in module.buffers()]
    cuda_devices = sorted({p.device.index for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        module.train()
        outputs = [
            t
            for t in tree_leaves(ddp(example_input, **(example_kwargs or {})))
            if isinstance(t, torch.Tensor) and t.requires_grad
        ]
        torch.stack([t.float().sum() for t in outputs]).sum().backward()
    module.train(was_training)
    with torch.no_grad():
        for buffer, saved in zip(module.buffers(), saved_buffers, strict=True):
            buffer.copy_(saved)
    for param in module.parameters():
        param.grad = None


def broadcast_from_rank_zero(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values: one broadcast per dtype, not one per tensor."""
    if not is_distributed():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    device = _reduction_device()  # NCCL broadcasts CUDA tensors only, gloo CPU ones
    with torch.no_grad():
        for same in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1).to(device) for t in same])
            dist.broadcast(flat, src=0)
            offset = 0
            for tensor in same:
                tensor.copy_(flat[offset : offset + tensor.numel()].view(tensor.shape))
                offset += tensor.numel()


@contextlib.contextmanager
def rank_zero_buffers(module: nn.Module) -> Iterator[None]:
    """Inside, every rank holds rank 0's buffers (BatchNorm running statistics); afterwards its own again.

    Each rank updates its running statistics with its own batches, so after a training step the ranks'
    buffers differ, while a checkpoint holds one copy of them (rank 0's). Evaluating and saving inside
    this context makes the logged metrics those of the checkpoint, on every rank and under any
    strategy. Training then continues with what each rank held before: evaluating and saving never
    change the run (under FSDP, which leaves buffers per rank, that keeps resume bit-exact).
    A collective: every rank enters it at the same point.
    """
    if not is_distributed():
        yield
        return
    buffers = list(module.buffers())
    with values_restored(buffers):
        broadcast_from_rank_zero(buffers)
        yield


@contextlib.contextmanager
def values_restored(tensors: list[torch.Tensor]) -> Iterator[None]:
    """Inside, ``tensors`` may be changed in place; on exit each holds its value from the entry again."""
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved, strict=True):
                tensor.copy_(value)


def persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the buffers a state_dict holds (non-persistent ones are rebuilt by the model), by name."""
    out = {}
    for prefix, sub in module.named_modules():
        for name, buffer in sub.named_buffers(recurse=False):
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buffer.detach().to("cpu", copy=True)
    return out


def restore_buffers(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy ``saved`` (from :func:`persistent_buffers`) into ``module``'s buffers of the same names."""
    buffers = dict(module.named_buffers())
    with torch.no_grad():
        for name, value in saved.items():
            buffers[name].copy_(value)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier(group: Any = None) -> None:
    if is_distributed():
        dist.barrier(group=group)


def _reduction_device(group: Any = None) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if is_distributed() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sync_bool(flag: bool, *, op: str = "any", group: Any = None) -> bool:
    """One decision all ranks agree on: ``any`` rank true, or ``all`` ranks true."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_reduction_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "any" else dist.ReduceOp.MIN, group=group)
    return bool(t.item())


class AsyncFlags:
    """Boolean decisions (any rank true) whose all-reduce overlaps with the next training step.

    ``post(flags)`` starts the reduction; ``result()`` (one step later) waits for it. Every rank
    posts and reads at the same steps, so all ranks act at the same step boundary while the cost
    of the check hides behind compute. With a CPU (gloo) ``group`` the flags never touch the GPU,
    so reading them forces no device synchronisation, and they do not queue behind the gradient
    all-reduces of the main group.
    """

    def __init__(self, size: int, group: Any = None) -> None:
        self.size = size
        self.group = group
        self._work: Any = None
        self._tensor: torch.Tensor | None = None
        self._local = [False] * size

    def post(self, flags: list[bool]) -> None:
        if self._work is not None or any(self._local):
            # A reduction still unread (a post at start-up followed by one before the first check):
            # its answer is folded into this one, never dropped.
            flags = [a or b for a, b in zip(flags, self.result(), strict=True)]
        if not is_distributed():
            self._local = list(flags)
            return
        device = torch.device("cpu") if self.group is not None else _reduction_device()
        self._tensor = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
        self._work = dist.all_reduce(self._tensor, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

    def result(self) -> list[bool]:
        if self._work is None:
            out, self._local = self._local, [False] * self.size
            return out
        self._work.wait()
        self._work = None
        assert self._tensor is not None
        return [bool(v) for v in self._tensor.tolist()]


def _all_reduce_scalars(values: dict[str, float], op: Any, group: Any) -> dict[str, float]:
    if not values or not is_distributed():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_reduction_device(group))
    dist.all_reduce(t, op=op, group=group)
    return dict(zip(keys, t.tolist(), strict=True))


def all_reduce_sums(values: dict[str, float], group: Any = None) -> dict[str, float]:
    """Sum scalars across ranks in one float64 all-reduce (exact for counts below 2**53)."""
    return _all_reduce_scalars(values, dist.ReduceOp.SUM, group)


def all_reduce_max(values: dict[str, float], group: Any = None) -> dict[str, float]:
    return _all_reduce_scalars(values, dist.ReduceOp.MAX, group)


def gather_objects_to_rank_zero(obj: Any, group: Any = None) -> list[Any] | None:
    """Gather one picklable object per rank on rank 0 (None elsewhere). For small state (RNG)."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=group)
    return out


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """One picklable object from every rank, in rank order, on every rank (for metric sums)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def new_cpu_group(timeout_s: float) -> Any:
    """A gloo group with its own timeout for control traffic (stop flags, checkpoint gathers): a
    dead rank fails a save within ``timeout_s`` instead of hanging it, and CPU objects need no
    device copies."""
    if not is_distributed():
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def new_checkpoint_group(timeout_s: float) -> Any:
    """A gloo group of all ranks for a sharded checkpoint's collectives (DCP's plan exchange, the
    manifest gather), whenever a process group exists, also FSDP's private one of a single process.

    ``dcp.async_save`` needs a group with a CPU backend: the default group of a GPU run is NCCL only
    (it asserts "A CPU backend must be enabled for async save"). Its own group also keeps the
    background save's collectives from interleaving with the training thread's (as torchtitan does).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def broadcast_object(obj: Any, group: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
