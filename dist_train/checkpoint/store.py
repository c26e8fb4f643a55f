"""The one interface the trainer saves and resumes through, whatever the checkpoint format.

- ``FileStore`` (DDP, one process): rank states gathered to rank 0, model and optimizer consolidated
  by the strategy, one ``ckpt-*.pt`` file written by rank 0 (``file.CheckpointManager``).
- ``ShardedStore`` (FSDP): every rank writes its own shard of model and optimizer and its own
  rank state into a new directory (``sharded.ShardedCheckpointManager``).

Reading does not depend on the store: ``open_checkpoint`` accepts both formats (a run may hold file
checkpoints of an earlier dtrain next to sharded ones); ``catalog`` finds the checkpoint to open.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dist_train.checkpoint.file import CheckpointManager, load_checkpoint
from dist_train.checkpoint.sharded import (
    ShardedCheckpointManager,
    load_sharded_model,
    load_sharded_model_and_optimizer,
    read_sharded_state,
)
from dist_train.distributed.comm import DistInfo, gather_objects_to_rank_zero, new_checkpoint_group
from dist_train.distributed.strategy import Strategy
from dist_train.errors import CheckpointError

# Config keys that change what a checkpoint means; anything else may change between resumes.
INCOMPATIBLE_ON_RESUME = (
    "model",
    "data.x_key",
    "data.y_key",
    "data.val_split",
    "data.test_split",
    "data.split_seed",
    "data.split_file",
    "data.stratify",
    "data.limit",
    "data.layout",
    "data.input_keys",
    "data.format",
    "data.representation",
    "data.geometry_file",
    "data.hit_keys",
    "data.pmts_per_module",
    "data.n_points",
    "data.channels",
    "task.name",
    "task.targets",
    "task.target_norm",
    "task.target_mean",
    "task.target_std",
    "optim.name",
    "sched.name",
    "run.seed",
    "train.strategy",  # the optimizer state is keyed by parameter index (DDP) or by name (FSDP)
)
# Stateful components newer than some format-1 checkpoints; such a checkpoint resumes with them fresh.
ADDED_SINCE_FORMAT_1 = ("early_stopping",)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def incompatible_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    old, new = _flatten(saved), _flatten(current)
    old.setdefault("train.strategy", "ddp")  # written before strategies existed
    diffs = []
    for key in sorted(set(old) | set(new)):
        if any(key == p or key.startswith(p + ".") for p in INCOMPATIBLE_ON_RESUME) and old.get(key) != new.get(key):
            diffs.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return diffs


def starts_fresh_on_resume(component: str, state: dict[str, Any]) -> bool:
    """A stateful component the checkpoint predates (an older dtrain wrote it): it resumes fresh."""
    return component in ADDED_SINCE_FORMAT_1 and component not in state


def check_config_compatible(path: Path, state: dict[str, Any], current_config: dict[str, Any]) -> None:
    """Refuse to resume from ``path`` under a config whose changes the checkpoint cannot follow."""
    diffs = incompatible_changes(state.get("config", {}), current_config)
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: the config changed in ways the checkpoint cannot follow: "
            + "; ".join(diffs)
            + ". Restore those settings, or start a new run with --resume never (or another --run-dir)."
        )


class CheckpointStore(Protocol):
    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        common: dict[str, Any],
        rank_state: dict[str, Any],
        *,
        epoch: int,
        step: int,
        metrics: dict[str, float],
        is_best: bool,
        blocking: bool,
    ) -> Path | None:
        """Collective: every rank calls it at the same step. ``common`` is the state every rank shares
        (read from rank 0), ``rank_state`` this rank's own. ``blocking``: return only when durable.
        Returns the checkpoint's path on rank 0."""
        ...

    def wait(self) -> None:
        """Returns when this rank's part of every save is durable (async saves run in the background)."""
        ...

    def close(self) -> None: ...

    @property
    def group(self) -> Any:
        """The gloo group its collectives run on (None: the default group, or one process)."""
        ...


class FileStore:
    def __init__(
        self, directory: Path, *, keep_last: int, async_save: bool, strategy: Strategy, is_main: bool, group: Any
    ) -> None:
        self.strategy = strategy
        self.group = group
        self.manager = CheckpointManager(directory, keep_last=keep_last, async_save=async_save) if is_main else None

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        common: dict[str, Any],
        rank_state: dict[str, Any],
        *,
        epoch: int,
        step: int,
        metrics: dict[str, float],
        is_best: bool,
        blocking: bool,
    ) -> Path | None:
        rank_states = gather_objects_to_rank_zero(rank_state, group=self.group)
        # A collective under FSDP: every rank takes part, the writer receives the values.
        model_and_optimizer = self.strategy.state_dicts(model, optimizer, writer=self.manager is not None)
        if self.manager is None:
            return None
        state = {**common, "rank_states": rank_states, **model_and_optimizer}
        path = self.manager.save(state, epoch=epoch, step=step, metrics=metrics, is_best=is_best)
        if blocking:
            self.manager.wait()
        return path

    def wait(self) -> None:
        if self.manager is not None:
            self.manager.wait()

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()


class ShardedStore:
    def __init__(self, directory: Path, *, keep_last: int, async_save: bool, dist_info: DistInfo, group: Any) -> None:
        self.group = group
        self.manager = ShardedCheckpointManager(
            directory,
            rank=dist_info.rank,
            group=group,
            keep_last=keep_last,
            async_save=async_save,
        )

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        common: dict[str, Any],
        rank_state: dict[str, Any],
        *,
        epoch: int,
        step: int,
        metrics: dict[str, float],
        is_best: bool,
        blocking: bool,
    ) -> Path | None:
        # Deferred like every DCP import (see checkpoint/sharded.py): DDP runs never pay for it.
        from torch.distributed.checkpoint.state_dict import get_state_dict

        # This rank's shards (DTensors), keyed by parameter name: nothing is gathered.
        model_sd, optim_sd = get_state_dict(model, optimizer)
        path = self.manager.save(
            {"model": model_sd, "optimizer": optim_sd},
            common,
            rank_state,
            epoch=epoch,
            step=step,
            metrics=metrics,
            is_best=is_best,
        )
        if blocking:
            self.manager.wait()
        return path

    def wait(self) -> None:
        self.manager.wait()

    def close(self) -> None:
        self.manager.close()


def build_checkpoint_store(
    *,
    directory: Path,
    strategy: Strategy,
    dist_info: DistInfo,
    keep_last: int,
    async_save: bool,
    barrier_timeout: float,
    control_group: Any,
) -> CheckpointStore:
    if strategy.name == "fsdp":
        # Its own gloo group (never the default group, which is NCCL-only on GPUs): an async save's
        # collectives run in a background thread and must not share a group with the training thread's.
        group = new_checkpoint_group(barrier_timeout)
        return ShardedStore(directory, keep_last=keep_last, async_save=async_save, dist_info=dist_info, group=group)
    return FileStore(
        directory,
        keep_last=keep_last,
        async_save=async_save,
        strategy=strategy,
        is_main=dist_info.is_main,
        group=control_group,
    )


@dataclass
class OpenedCheckpoint:
    """A checkpoint's state without (sharded) or with (file) model and optimizer, ready to restore."""

    path: Path
    state: dict[str, Any]

    def restore_model_and_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, strategy: Strategy, group: Any = None
    ) -> None:
        """``group``: the gloo group a sharded load's collectives run on (the checkpoint store's)."""
        if self.path.is_dir():
            load_sharded_model_and_optimizer(
                self.path, model, optimizer, self.state.get("model_and_optimizer_rest", {}), group=group
            )
        else:
            strategy.load_state_dicts(model, optimizer, self.state)

    def restore_model(self, model: nn.Module, strategy: Strategy, group: Any = None) -> None:
        """The model's weights only (the test of the best checkpoint); a collective for sharded checkpoints."""
        if self.path.is_dir():
            load_sharded_model(self.path, model, self.state.get("model_and_optimizer_rest", {}), group=group)
        else:
            strategy.load_model_state_dict(model, self.state["model"])


def open_checkpoint(path: Path, *, verify: bool = True, for_rank: tuple[int, int] | None = None) -> OpenedCheckpoint:
    """``for_rank = (rank, world_size)`` of the reading process: a sharded checkpoint of the same world
    size then reads only that rank's own state file."""
    path = Path(path)
    if path.is_dir():
        return OpenedCheckpoint(path, read_sharded_state(path, verify=verify, for_rank=for_rank))
    return OpenedCheckpoint(path, load_checkpoint(path, map_location="cpu", verify=verify))
