"""How the model is spread over the ranks: DDP (replicated) or FSDP2 (sharded).

The trainer has one loop; everything that differs between the two lives here: wrapping,
skipping gradient synchronisation on non-final micro-steps, gradient clipping (FSDP's gradients
are sharded DTensors), the model and optimizer state that goes into a checkpoint, and evaluation
(which may run different batch counts per rank, so FSDP must not all-gather inside it).

Imports: ``torch.distributed.fsdp``, ``torch.distributed.tensor`` and ``torch.distributed.checkpoint``
are imported inside the FSDP functions that use them: each costs 0.5-0.7 s per process, which DDP
workers (most runs) would otherwise pay for nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_train.config import Config, FSDPConfig, check_strategy_supported, check_sync_batchnorm_device
from dist_train.distributed.comm import persistent_buffers, values_restored
from dist_train.distributed.precision import resolve_precision
from dist_train.errors import ConfigError

log = logging.getLogger("dtrain")


class Strategy(Protocol):
    name: str

    def wrap(self, model: nn.Module) -> nn.Module:
        """Returns the module the training forward runs through (``model`` itself may change in place)."""
        ...

    def grad_sync(self, train_model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]: ...

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor: ...

    def grad_scaler(self, *, enabled: bool) -> torch.amp.GradScaler:
        """fp16's loss scaler (disabled: a no-op, which is every bf16/fp32 run)."""
        ...

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, writer: bool) -> dict[str, Any]:
        """``{"model": ..., "optimizer": ...}`` for the checkpoint; every rank calls it, the writer gets the values."""
        ...

    def load_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None: ...

    def load_model_state_dict(self, model: nn.Module, model_state: dict[str, Any]) -> None:
        """A full (consolidated) model state dict, read from a file, into this rank's model."""
        ...

    def eval_context(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]: ...

    def rank_buffers(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """This rank's own buffers for its rank state, where they outlive a training step ({} where not):
        a resume on as many ranks restores them, so training continues exactly as it would have."""
        ...


def build_strategy(cfg: Config, device: torch.device, world_size: int, distributed: bool) -> Strategy:
    if cfg.train.strategy == "fsdp":
        check_strategy_supported(cfg, torch.__version__)
        return FSDPStrategy(cfg.fsdp, _fsdp_param_dtype(cfg, device), device, world_size)
    return DDPStrategy(device, distributed, cfg.train.find_unused_parameters)


def use_sync_batchnorm(model: nn.Module, cfg: Config, device: torch.device, world_size: int) -> nn.Module:
    """``train.sync_batchnorm``: every BatchNorm layer becomes a SyncBatchNorm, before the model is wrapped.

    The new layers hold the same parameter and buffer tensors under the same state_dict keys, so a
    checkpoint loads with the setting on or off (and into ``dtrain eval``'s plain model).
    """
    if not cfg.train.sync_batchnorm:
        return model
    if world_size == 1:
        log.info("train.sync_batchnorm: one process, nothing to synchronise; BatchNorm layers stay as they are")
        return model
    check_sync_batchnorm_device(cfg, device_type=device.type, world_size=world_size)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    count = sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    if count:
        log.info("train.sync_batchnorm: %d BatchNorm layer(s) use the statistics of all %d ranks", count, world_size)
    else:
        log.warning("train.sync_batchnorm = true, but the model has no BatchNorm layer: nothing to synchronise")
    return converted


def _fsdp_param_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    return resolve_precision(cfg.train.precision, device).dtype  # the same resolution as autocast's


class DDPStrategy:
    """Every rank holds the whole model; gradients are all-reduced (single process: the plain model)."""

    name = "ddp"

    def __init__(self, device: torch.device, distributed: bool, find_unused_parameters: bool) -> None:
        self.device = device
        self.distributed = distributed
        self.find_unused_parameters = find_unused_parameters

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=self.find_unused_parameters)

    def grad_sync(self, train_model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
        if sync:  # most steps: no attribute lookup (a Module's failing getattr raises inside, per step)
            return contextlib.nullcontext()
        no_sync = getattr(train_model, "no_sync", None)
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def grad_scaler(self, *, enabled: bool) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=enabled)

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, writer: bool) -> dict[str, Any]:
        if not writer:
            return {}
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    def load_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def load_model_state_dict(self, model: nn.Module, model_state: dict[str, Any]) -> None:
        model.load_state_dict(model_state)

    def eval_context(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def rank_buffers(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """None: DDP (``broadcast_buffers``) gives every rank rank 0's buffers at the start of each forward, so a
        rank's own never outlive a step; the checkpoint's (rank 0's) are what every rank continues with."""
        return {}


class FSDPStrategy:
    """FSDP2 (``fully_shard``): each rank holds 1/world of parameters, gradients and optimizer state."""

    name = "fsdp"

    def __init__(self, cfg: FSDPConfig, param_dtype: torch.dtype | None, device: torch.device, world_size: int) -> None:
        self.cfg = cfg
        self.param_dtype = param_dtype
        self.device = device
        self.world_size = world_size

    # -------------------------------------------------------------- wrapping
    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        _ensure_process_group(self.device)
        # An explicit mesh: without one, on a machine with GPUs, parameters move to CUDA even for a
        # CPU run (pytorch #132471).
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        # Compute in train.precision, reduce gradients in fp32 (sums of many bf16 values lose digits).
        mp = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
        offload = CPUOffloadPolicy(pin_memory=False) if self.cfg.cpu_offload else OffloadPolicy()
        norms = _norms_with_running_stats(model) if self.param_dtype is not None else []
        if norms:
            # Leaves first (fully_shard needs children before parents), as one group: one all-gather
            # and one reduce-scatter for all of them instead of one pair per norm layer.
            fully_shard(
                norms,
                mesh=mesh,
                reshard_after_forward=self.cfg.reshard_after_forward,
                mp_policy=_norm_policy(mp),
                offload_policy=offload,
            )
        units = self._choose_units(model, already_sharded=norms)
        checkpointed = self._activation_checkpoint_names(units)
        for path, unit in units:
            if type(unit).__name__ in checkpointed:
                unit = _replace_with_checkpoint_wrapper(model, path, unit)
            fully_shard(
                unit,
                mesh=mesh,
                reshard_after_forward=self.cfg.reshard_after_forward,
                mp_policy=mp,
                offload_policy=offload,
            )
        fully_shard(
            model, mesh=mesh, reshard_after_forward=self.cfg.reshard_after_forward, mp_policy=mp, offload_policy=offload
        )
        log.info(
            "FSDP: %d sharded unit(s) + root over %d rank(s)%s%s%s",
            len(units),
            self.world_size,
            f", {len(norms)} norm layer(s) with running statistics in fp32" if norms else "",
            ", activation checkpointing" if checkpointed else "",
            ", CPU offload" if self.cfg.cpu_offload else "",
        )
        return model

    def _choose_units(self, model: nn.Module, already_sharded: list[nn.Module]) -> list[tuple[str, nn.Module]]:
        """Sub-modules sharded as their own units, innermost first (fully_shard needs children before parents).

        ``already_sharded`` (the norm group) are no units and their parameters count towards none."""
        done = {id(m) for m in already_sharded}
        named = [(path, m) for path, m in model.named_modules() if path and id(m) not in done]
        if self.cfg.wrap:
            units = [(p, m) for p, m in named if type(m).__name__ in self.cfg.wrap]
            if not units:
                present = sorted({type(m).__name__ for _, m in named})
                raise ConfigError(
                    f"fsdp.wrap = {self.cfg.wrap!r} matches no module of this model. Its module classes are: "
                    + ", ".join(present)
                    + ". Name some of them, or leave fsdp.wrap empty for the automatic policy (fsdp.min_params)."
                )
            return _innermost_first(units)
        # Automatic: post-order, a module becomes a unit when the parameters not yet in a unit reach min_params.
        owned = {id(p) for m in already_sharded for p in m.parameters()}
        units = []
        for path, module in reversed(named):
            free = [p for p in module.parameters() if id(p) not in owned]
            if sum(p.numel() for p in free) >= self.cfg.min_params:
                units.append((path, module))
                owned.update(id(p) for p in free)
        return units

    def _activation_checkpoint_names(self, units: list[tuple[str, nn.Module]]) -> set[str]:
        ac = self.cfg.activation_checkpointing
        if ac is True:
            return {type(m).__name__ for _, m in units}
        if isinstance(ac, list):
            return set(ac)
        return set()

    # -------------------------------------------------------------- steps
    def grad_sync(self, train_model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
        # Non-final micro-steps keep unsharded local gradients; the final one reduce-scatters their sum.
        _root_fsdp(train_model).set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """The global norm over all shards (the DTensor norm is a partial sum until full_tensor())."""
        from torch.distributed.tensor import DTensor

        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def grad_scaler(self, *, enabled: bool) -> torch.amp.GradScaler:
        """The plain scaler, as PyTorch's own FSDP2 tests use it: the gradients are DTensors, and DTensor's
        inf/NaN check-and-unscale all-reduces "found inf" over the mesh, so every rank skips the same
        steps although each sees only its shard (FSDP1's ShardedGradScaler would reduce a second time)."""
        return torch.amp.GradScaler(self.device.type, enabled=enabled)

    # -------------------------------------------------------------- state
    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, writer: bool) -> dict[str, Any]:
        """Consolidated (full) model and optimizer state on the writer; a collective, every rank calls it.

        Keys are parameter names without FSDP or checkpoint-wrapper prefixes, so the file loads into
        the plain model (``dtrain eval``) and into FSDP on any number of ranks.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        return {"model": model_sd, "optimizer": optim_sd} if writer else {}

    def load_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Every rank holds the full state (read from the file) and keeps its own shard of it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
        )

    def load_model_state_dict(self, model: nn.Module, model_state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))

    @contextlib.contextmanager
    def eval_context(self, model: nn.Module) -> Iterator[None]:
        """Gather every unit once and keep it gathered: evaluation shards are unpadded, so ranks may run
        different numbers of batches, and an all-gather per forward would leave some ranks waiting."""
        units = _fsdp_modules(model)
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(self.cfg.reshard_after_forward and unit is not model, recurse=False)

    def rank_buffers(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """All of them: FSDP does not synchronise buffers, so each rank's evolve with its own batches all run
        long (the checkpoint's model state holds rank 0's, see ``distributed.rank_zero_buffers``)."""
        return persistent_buffers(model)


def _ensure_process_group(device: torch.device) -> None:
    """One process (world size 1, or --debug) has no process group; fully_shard needs one.

    A private in-memory group keeps the rest of the trainer single-process (``is_distributed()``
    stays false) while FSDP applies the same mixed precision and state-dict handling as on N ranks.
    """
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _is_norm_with_running_stats(module: nn.Module) -> bool:
    return (
        isinstance(module, _NormBase)
        and module.track_running_stats
        and any(True for _ in module.parameters(recurse=False))
    )


def _norms_with_running_stats(model: nn.Module) -> list[nn.Module]:
    """BatchNorm/InstanceNorm layers with affine parameters and running statistics.

    FSDP's ``param_dtype`` casts parameters, not buffers: in bf16/fp16 their weights would be low
    precision beside fp32 running statistics, which batch_norm rejects ("expected scalar type
    BFloat16 but found Float" on the CPU, "Expected running_mean to have type BFloat16" in backward
    on CUDA). Under DDP's autocast these layers keep fp32 parameters and statistics and take a
    low-precision input; sharding them with an fp32 policy does the same, so both strategies
    compute the same numbers. Layers without affine parameters are left alone (nothing is cast).
    """
    return [m for m in model.modules() if _is_norm_with_running_stats(m)]


def _norm_policy(mp: Any) -> Any:
    """fp32 parameters and computation, fp32 gradient reduction, output in the model's compute dtype
    (the next layer receives what it would receive from any other layer)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(
        param_dtype=None, reduce_dtype=torch.float32, output_dtype=mp.param_dtype, cast_forward_inputs=False
    )


def _fsdp_modules(model: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _root_fsdp(model: nn.Module) -> Any:
    from torch.distributed.fsdp import FSDPModule

    root = getattr(model, "_orig_mod", model)  # through torch.compile
    assert isinstance(root, FSDPModule), "FSDPStrategy.grad_sync needs the fully_shard-ed root"
    return root


def _innermost_first(units: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    return sorted(units, key=lambda u: -u[0].count("."))


def _replace_with_checkpoint_wrapper(model: nn.Module, path: str, unit: nn.Module) -> nn.Module:
    """Recompute ``unit``'s activations in backward; the wrapper hides itself from state_dict keys."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    wrapped = checkpoint_wrapper(unit, context_fn=functools.partial(_recompute_contexts, unit))
    setattr(parent, attr, wrapped)
    return wrapped


def _recompute_contexts(
    unit: nn.Module,
) -> tuple[contextlib.AbstractContextManager[Any], contextlib.AbstractContextManager[Any]]:
    """(forward, recomputation) contexts of torch.utils.checkpoint for ``unit``."""
    return contextlib.nullcontext(), _running_statistics_kept(unit)


def _running_statistics_kept(unit: nn.Module) -> contextlib.AbstractContextManager[None]:
    """The recomputation in backward runs the forward again in training mode: without this, every
    BatchNorm's running statistics (and num_batches_tracked) would be updated twice per step."""
    buffers = [
        b
        for m in unit.modules()
        if isinstance(m, _NormBase) and m.track_running_stats
        for b in m.buffers(recurse=False)
    ]
    return values_restored(buffers)
