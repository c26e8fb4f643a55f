"""The one reader of a checkpoints directory, whatever the format: list, newest valid, best/latest, describe.

Resume (the trainer), ``dtrain eval``, ``dtrain ckpt inspect`` and ``dtrain ckpt export`` all find and
read checkpoints here. A directory may hold single-file checkpoints (``file.py``) next to sharded ones
(``sharded.py``): a run of an earlier dtrain, or one that changed strategy; both count, newest first.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dist_train.checkpoint.file import load_file_for_reading, load_file_unverified, read_sidecar, verify_checkpoint
from dist_train.checkpoint.layout import (
    BEST_NAME,
    BEST_POINTER,
    CHECKPOINTS_SUBDIR,
    LATEST_POINTER,
    checkpoint_files,
    parse_file_name,
    parse_sharded_name,
    read_pointer,
    sharded_checkpoint_dirs,
)
from dist_train.checkpoint.sharded import consolidate, read_manifest, verify_sharded_checkpoint
from dist_train.errors import CheckpointError

log = logging.getLogger("dtrain.checkpoint")  # under "dtrain": the run's log files and console get it


# ------------------------------------------------------------------------------------------------ listing


@dataclass(frozen=True)
class CheckpointRecord:
    """One checkpoint (file or sharded directory) of a directory, as ``list_checkpoints`` reports it."""

    path: Path
    epoch: int
    step: int
    size_bytes: int
    valid: bool
    problem: str | None = None  # why it is invalid (None when valid)
    is_latest: bool = False  # the ``latest`` pointer names it
    metrics: dict[str, float] = field(default_factory=dict)
    created: float | None = None  # unix time its sidecar or manifest recorded

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def _position(path: Path) -> tuple[int, int, int]:
    """(epoch, step, duplicate) from the name of a checkpoint file or directory."""
    parsed = parse_sharded_name(path.name) if path.is_dir() else parse_file_name(path.name)
    return parsed or (0, 0, 0)


def _newest_first_key(path: Path) -> tuple[int, int, int, int]:
    """(epoch, step, duplicate), a directory after a file of the same name."""
    return (*_position(path), int(path.is_dir()))


def checkpoint_paths(directory: Path) -> list[Path]:
    """Checkpoint files and sharded checkpoint directories of ``directory``, newest first."""
    found = [*checkpoint_files(directory), *sharded_checkpoint_dirs(directory)]
    return sorted(found, key=_newest_first_key, reverse=True)


def verify(path: Path, *, deep: bool = True) -> str | None:
    """None when the checkpoint matches its sidecar (file) or manifest (directory); otherwise why not."""
    return verify_sharded_checkpoint(path, deep=deep) if Path(path).is_dir() else verify_checkpoint(path, deep=deep)


def _recorded_metadata(path: Path) -> dict[str, Any]:
    """What the writer recorded beside the data (sidecar or manifest); empty when unreadable."""
    try:
        return read_manifest(path) if path.is_dir() else read_sidecar(path)
    except ValueError:
        return {}


def _size_on_disk(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def _record(path: Path, latest: str | None, *, deep: bool) -> CheckpointRecord:
    epoch, step, _ = _position(path)
    problem = verify(path, deep=deep)
    meta = _recorded_metadata(path)
    return CheckpointRecord(
        path=path,
        epoch=epoch,
        step=step,
        size_bytes=_size_on_disk(path),
        valid=problem is None,
        problem=problem,
        is_latest=path.name == latest,
        metrics=dict(meta.get("metrics") or {}),
        created=meta.get("created"),
    )


def list_checkpoints(directory: Path, *, deep: bool = True) -> list[CheckpointRecord]:
    """Every checkpoint of ``directory``, newest first, with its validity (``deep`` checks sha256s, else sizes)."""
    latest = read_pointer(directory, LATEST_POINTER)
    return [_record(path, latest, deep=deep) for path in checkpoint_paths(directory)]


# ------------------------------------------------------------------------------------------ finding one


def latest_valid_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint that verifies; invalid newer ones are logged and skipped."""
    directory = Path(directory)
    pointed = read_pointer(directory, LATEST_POINTER)
    for path in checkpoint_paths(directory):
        problem = verify(path)
        if problem is None:
            if pointed is not None and pointed != path.name:
                log.info("using %s, newer than %s named by %s", path.name, pointed, LATEST_POINTER)
            return path
        log.warning("checkpoint %s is invalid (%s); falling back to an older checkpoint", path, problem)
    if pointed is not None:
        log.warning("%s names %s, but no valid checkpoint exists in %s", LATEST_POINTER, pointed, directory)
    return None


def best_checkpoint(directory: Path) -> Path | None:
    """best.pt (single-file checkpoints), or the directory the ``best`` pointer names (sharded ones)."""
    directory = Path(directory)
    if (directory / BEST_NAME).is_file():
        return directory / BEST_NAME
    name = read_pointer(directory, BEST_POINTER)
    return directory / name if name and (directory / name).is_dir() else None


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint sits in (``<run>/checkpoints/<checkpoint>``); None for one outside a run."""
    parent = Path(checkpoint).parent
    return parent.parent if parent.name == CHECKPOINTS_SUBDIR else None


def resolve_checkpoint_path(path: Path, *, which: str = "latest") -> Path:
    """A checkpoint (file or sharded directory) from itself, a checkpoints directory, or a run directory.

    ``which = "best"`` takes a run directory's best checkpoint when it has one (else its newest valid)."""
    path = Path(path)
    if path.is_file() or (path.is_dir() and parse_sharded_name(path.name) is not None):
        return path  # a checkpoint file, or one sharded checkpoint directory
    if not path.is_dir():
        raise CheckpointError(
            f"{path} does not exist; pass a checkpoint file, a checkpoints directory or a run directory."
        )
    directory = path / CHECKPOINTS_SUBDIR if (path / CHECKPOINTS_SUBDIR).is_dir() else path
    found = best_checkpoint(directory) if which == "best" and directory != path else None
    found = found or latest_valid_checkpoint(directory)
    if found is None:
        raise CheckpointError(
            f"no valid checkpoint in {directory} (expected ckpt-e*-s*.pt files with .sha256.json sidecars, "
            "or ckpt-e*-s* directories with a manifest.json)."
        )
    return found


def load_for_reading(path: Path) -> dict[str, Any]:
    """Any checkpoint as one dict with "model", "config", epoch, step and metrics, in this process (no
    process group): a sharded directory consolidated, a checkpoint file, or an exported model (``dtrain ckpt export``)."""
    path = Path(path)
    return consolidate(path) if path.is_dir() else load_file_for_reading(path)


# ------------------------------------------------------------------------------------------ description


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in _tensors(value)]
    if isinstance(obj, (list, tuple)):
        return [t for value in obj for t in _tensors(value)]
    return []


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes on disk: every storage once, however many views share it."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _element_count(tensors: list[torch.Tensor]) -> int:
    unique = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): t.numel() for t in tensors}
    return sum(unique.values())


_CONFIG_SUMMARY_KEYS = [
    ("run", "name"),
    ("data", "path"),
    ("data", "batch_size"),
    ("model", "name"),
    ("optim", "name"),
    ("optim", "lr"),
    ("sched", "name"),
    ("train", "epochs"),
    ("train", "precision"),
]


def _config_summary(config: Any) -> dict[str, Any]:
    if not isinstance(config, dict):
        return {}
    summary = {}
    for section, key in _CONFIG_SUMMARY_KEYS:
        table = config.get(section)
        if isinstance(table, dict) and key in table:
            summary[f"{section}.{key}"] = table[key]
    return summary


def _read_state_to_describe(path: Path, problem: str | None) -> dict[str, Any]:
    """The checkpoint's state, unverified (the check's result is reported beside it)."""
    if not path.is_dir():
        try:
            return load_file_unverified(path)
        except CheckpointError as exc:
            if problem is not None:
                raise CheckpointError(f"{exc} Its checksum check also failed: {problem}.") from None
            raise
    try:
        return consolidate(path, optimizer=True, verify=False)
    except (CheckpointError, OSError, RuntimeError, ValueError, KeyError) as exc:
        reason = f" Its check also failed: {problem}." if problem else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}.{reason}") from None


def _tensor_bytes(path: Path, state: dict[str, Any]) -> dict[str, int]:
    """Bytes per section holding tensors, and in total (a sharded checkpoint: model and optimizer only)."""
    if path.is_dir():
        sections = {name: _storage_bytes(_tensors(state.get(name, {}))) for name in ("model", "optimizer")}
        return {**sections, "total": sum(sections.values())}
    sections = {name: _storage_bytes(_tensors(value)) for name, value in state.items() if _tensors(value)}
    return {**sections, "total": _storage_bytes(_tensors(state))}


def describe_checkpoint(path: Path) -> dict[str, Any]:
    """What ``dtrain ckpt inspect`` shows: progress, metrics, versions, sizes, config and validity."""
    path = resolve_checkpoint_path(path)
    problem = verify(path)
    meta = _recorded_metadata(path)
    state = _read_state_to_describe(path, problem)
    model_tensors = _tensors(state.get("model", {}))
    format_specific = {"files": len(meta.get("files", {}))} if path.is_dir() else {}
    return {
        "path": str(path),
        "file_bytes": _size_on_disk(path),
        "valid": problem is None,
        "problem": problem,
        "sha256": None if path.is_dir() else meta.get("sha256"),
        **format_specific,
        "format_version": state.get("format_version"),
        "epoch": state.get("epoch", meta.get("epoch")),
        "step": state.get("step", meta.get("step")),
        "epoch_complete": state.get("epoch_complete"),
        "reason": state.get("reason"),
        "metrics": state.get("metrics", meta.get("metrics", {})),
        "world_size": state.get("world_size"),
        "dtrain_version": state.get("dtrain_version"),
        "torch_version": state.get("torch_version"),
        "model_elements": _element_count(model_tensors),
        "model_tensors": len(model_tensors),
        "tensor_bytes": _tensor_bytes(path, state),
        "config_summary": _config_summary(state.get("config")),
        "config": state.get("config"),
    }
