"""Sharded checkpoints (``strategy = "fsdp"``): every rank writes its own shard, nothing is gathered.

Layout of one checkpoint, a directory beside the single-file checkpoints of ``<run_dir>/checkpoints/``::

    ckpt-e0003-s00001200/
        .metadata, __<rank>_0.distcp   torch.distributed.checkpoint (DCP): model + optimizer tensors, sharded
        rank-00000.pt ...              each rank's own state (RNG streams, partial-epoch metric sums)
        common.pt                      everything else the single-file checkpoint holds (config, counters,
                                       scheduler, sampler, scaler, optimizer param_groups, ...)
        manifest.json                  every file's relative path, size and sha256, plus the sidecar's fields
    .ckpt-e0003-s00001200.<hex>.tmp/   a save in progress (or left by a crash); readers ignore it
    latest                             text: name of the newest complete checkpoint
    best                               text: name of the best complete checkpoint (pruning keeps it)

Atomicity: a save writes into a NEW temporary directory; DCP fsyncs every shard and its metadata, each
rank fsyncs its own rank file, and every rank hashes its own files. Only after all ranks reported (a
gather, i.e. a barrier) does rank 0 write ``common.pt`` and the manifest (fsynced), fsync the
temporary directory, rename it to its final name (a name never used before: a second save at the same
step gets ``-1``), fsync the parent, and then move ``latest`` (and ``best``). A crash at any point
leaves either no directory of the new name or a complete one; a directory without a manifest that
matches its files is never loaded (its files are listed by the manifest, so stray or missing shards
show). A checkpoint directory is never written into after its rename, so the "old metadata beside a mix
of old and new shards" state of an overwritten DCP directory cannot happen.

Safety: only tensors go through DCP (non-tensor leaves such as ``param_groups`` are split off into
``common.pt``), DCP's tensor records are read with ``torch.load(weights_only=True)``, its pickled
``.metadata`` is read with an unpickler that accepts only DCP's own metadata classes, and the
``*.pt`` files are loaded with ``weights_only=True``.

Imports: ``torch.distributed.checkpoint`` is imported inside the functions that use it. Importing it
costs about 0.5 s per process, and every DDP worker, ``dtrain eval`` and ``dtrain ckpt`` imports this
module without ever touching a sharded checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dist_train.checkpoint.background import BackgroundWriter
from dist_train.checkpoint.file import snapshot_state, torch_load_safely
from dist_train.checkpoint.layout import (
    BEST_POINTER,
    LATEST_POINTER,
    MANIFEST_NAME,
    hash_file,
    make_checkpoint_directory,
    read_pointer,
    sharded_checkpoint_dirs,
    sharded_checkpoint_name,
    write_pointer,
)
from dist_train.distributed.comm import barrier, broadcast_object, gather_objects_to_rank_zero
from dist_train.errors import CheckpointError
from dist_train.fsutil import atomic_write_text, fsync_dir, fsync_file

log = logging.getLogger("dtrain.checkpoint")  # under "dtrain": the run's log files and console get it

SHARDED_FORMAT = "dtrain-sharded"
SHARDED_FORMAT_VERSION = 1
COMMON_NAME = "common.pt"
# Test-only fault injection (tests/test_sharded_checkpoint.py): "<phase>:<rank>:<save number>" makes that
# rank stop at that point of that save (1-based, counted per process) and wait to be killed.
FAULT_ENV = "DTRAIN_TEST_CHECKPOINT_FAULT"


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


# ------------------------------------------------------------------------------------------ tensors vs. rest


def split_tensors(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(nested dicts of the tensor leaves, the same nesting of everything else).

    DCP would pickle non-tensor leaves and read them back with ``torch.load(weights_only=False)``; they
    travel in ``common.pt`` instead, which loads with ``weights_only=True``.
    """
    tensors: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, dict):
            sub_tensors, sub_plain = split_tensors(value)
            if sub_tensors:
                tensors[key] = sub_tensors
            plain[key] = sub_plain
        else:
            plain[key] = value
    return tensors, plain


def merge_tensors(tensors: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    merged = dict(plain)
    for key, value in tensors.items():
        merged[key] = merge_tensors(value, plain.get(key, {})) if isinstance(value, dict) else value
    return merged


# ------------------------------------------------------------------------------------------- safe metadata


def _allowed_global(module: str, name: str) -> bool:
    if module == "torch.distributed.checkpoint.metadata":
        return True
    if (module, name) in {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("collections", "OrderedDict"),
    }:
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not _allowed_global(module, name):
            raise pickle.UnpicklingError(f"unexpected global {module}.{name} in DCP metadata")
        return super().find_class(module, name)


def _read_metadata_safely(path: Path) -> Any:
    try:
        with open(Path(path) / ".metadata", "rb") as fh:
            return _MetadataUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{path}/.metadata is not DCP metadata: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}/.metadata: {exc.strerror}") from None


def _safe_reader(path: Path) -> Any:
    """A DCP FileSystemReader whose ``.metadata`` unpickling accepts DCP's own classes only.

    The metadata is read once here first, so a bad file is one clear CheckpointError (DCP itself would
    catch the reader's exception and retry other metadata layouts)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    _read_metadata_safely(path)

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = _read_metadata_safely(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(path))


# -------------------------------------------------------------------------------------------- verification


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint directory ``path``; ValueError with a short reason when unusable."""
    manifest_path = Path(path) / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no {MANIFEST_NAME} (the save did not finish, or not written by dtrain)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{MANIFEST_NAME} is unreadable ({exc})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != SHARDED_FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise ValueError(f"{MANIFEST_NAME} is not a dtrain sharded-checkpoint manifest")
    if manifest.get("name") != Path(path).name:
        raise ValueError(f"{MANIFEST_NAME} describes {manifest.get('name')!r}, not {Path(path).name}")
    return manifest


def verify_sharded_checkpoint(path: Path, *, deep: bool = True) -> str | None:
    """None when every file the manifest lists exists with its size (and, ``deep``, its sha256)."""
    path = Path(path)
    if not path.is_dir():
        return "directory does not exist"
    try:
        manifest = read_manifest(path)
    except ValueError as exc:
        return str(exc)
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > SHARDED_FORMAT_VERSION:
        return f"format_version {version!r}; this dtrain reads up to {SHARDED_FORMAT_VERSION} (upgrade dtrain)"
    for relative, entry in sorted(manifest["files"].items()):
        file = path / relative
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            return f"manifest names {relative!r}, outside the checkpoint"
        try:
            size = file.stat().st_size
        except OSError:
            return f"{relative} is missing"
        if size != entry.get("size"):
            return f"{relative} is {size} bytes but {entry.get('size')} were written (truncated or replaced)"
        if deep:
            try:
                _, actual = hash_file(file)
            except OSError as exc:
                return f"cannot read {relative} ({exc.strerror})"
            if actual != entry.get("sha256"):
                return f"sha256 mismatch in {relative} (file {actual[:12]}…, recorded {str(entry.get('sha256'))[:12]}…): the bytes are corrupt"
    return None


# ------------------------------------------------------------------------------------------------ writing


def _fault_point(phase: str, rank: int, save_number: int, run_dir: Path) -> None:
    """Test-only: stop here and wait to be killed (see FAULT_ENV)."""
    wanted = os.environ.get(FAULT_ENV, "")
    if wanted != f"{phase}:{rank}:{save_number}":
        return
    atomic_write_text(run_dir / f"fault-{phase}-rank{rank}", f"{os.getpid()}\n")
    log.warning("test fault point %s reached on rank %d; waiting to be killed", phase, rank)
    time.sleep(3600)


class ShardedCheckpointManager:
    """Writes sharded checkpoints; every rank constructs one and calls ``save`` at the same step.

    ``group`` (a gloo group, None for one process) carries the save's small collectives. With
    ``async_save`` DCP stages the shards into CPU memory inside ``save()`` and a background thread
    writes, hashes and (rank 0) publishes them; at most one save is in flight, a background failure is
    raised by the next call. The background collectives run on ``group``, which nothing else may use.
    """

    def __init__(
        self,
        directory: Path,
        *,
        rank: int,
        group: Any,
        keep_last: int = 3,
        async_save: bool = False,
    ) -> None:
        if keep_last < 0:
            raise CheckpointError(f"checkpoint.keep_last must be >= 0 (0 keeps all), got {keep_last}.")
        self.directory = Path(directory)
        self.rank = rank
        self.group = group
        self.keep_last = keep_last
        self.async_save = async_save
        self._saves = 0
        self._background: BackgroundWriter[Path | None] = BackgroundWriter()
        self._stager: Any = None
        if self.rank == 0:
            make_checkpoint_directory(self.directory)
            self.remove_stale_temp_dirs()
        barrier(group=self.group)  # no rank writes into the directory before the sweep is done

    # ---- housekeeping

    def remove_stale_temp_dirs(self) -> None:
        """Temporary directories of saves that a crash interrupted (never loaded; safe to delete at start)."""
        for tmp in self.directory.glob(".ckpt-*.tmp"):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
                log.warning("removed %s, left by an interrupted checkpoint save", tmp)

    def _free_name(self, epoch: int, step: int) -> str:
        """A name no earlier save used: a directory ``latest`` may name is never written into again."""
        duplicate = 0
        while (self.directory / sharded_checkpoint_name(epoch, step, duplicate)).exists():
            duplicate += 1
        return sharded_checkpoint_name(epoch, step, duplicate)

    # ---- saving

    def save(
        self,
        model_and_optimizer: dict[str, Any],
        common: dict[str, Any],
        rank_state: dict[str, Any],
        *,
        epoch: int,
        step: int,
        metrics: dict[str, float] | None = None,
        is_best: bool = False,
    ) -> Path | None:
        """Collective. ``model_and_optimizer`` holds this rank's shards (``get_state_dict``); ``common`` is
        read on rank 0 only. Returns the final path on rank 0 (None elsewhere)."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        self._saves += 1
        names = (self._free_name(epoch, step), f".{uuid.uuid4().hex}") if self.rank == 0 else None
        final_name, tmp_tag = broadcast_object(names, group=self.group)
        tmp = self.directory / f".{final_name}{tmp_tag}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        tensors, plain = split_tensors(model_and_optimizer)
        rank_path = tmp / rank_file_name(self.rank)
        _torch_save_durably(snapshot_state(rank_state), rank_path)
        if self.rank == 0:
            common = {**snapshot_state(common), "model_and_optimizer_rest": snapshot_state(plain)}
            _torch_save_durably(common, tmp / COMMON_NAME)
        meta = {
            "name": final_name,
            "epoch": int(epoch),
            "step": int(step),
            "metrics": {str(k): float(v) for k, v in (metrics or {}).items()},
        }
        writer = dcp.FileSystemWriter(str(tmp), sync_files=True, overwrite=False)
        if not self.async_save:
            with self._failures_named(tmp, final_name):
                dcp.save(tensors, storage_writer=writer, process_group=self.group)
            return self._finish(tmp, meta, common if self.rank == 0 else {}, is_best)
        staged = dcp.async_save(
            tensors, storage_writer=writer, process_group=self.group, async_stager=self._async_stager()
        )
        upload = staged.upload_completion if hasattr(staged, "upload_completion") else staged
        self._background.submit(self._finish_after, upload, tmp, meta, common if self.rank == 0 else {}, is_best)
        return self.directory / final_name if self.rank == 0 else None

    def _async_stager(self) -> Any:
        """One stager for the manager's life: it keeps its CPU (pinned, with CUDA) buffers per storage, so
        every save after the first is a plain copy instead of fresh allocations. Reuse is safe because a
        save first waits for the previous write. None (DCP's default, a fresh copy) where torch lacks it."""
        if self._stager is None:
            try:
                from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
            except ImportError:
                return None
            gpu = torch.cuda.is_available()
            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=gpu, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=gpu
                )
            )
        return self._stager

    def _finish_after(
        self, upload: Any, tmp: Path, meta: dict[str, Any], common: dict[str, Any], is_best: bool
    ) -> Path | None:
        with self._failures_named(tmp, meta["name"]):
            upload.result()
        return self._finish(tmp, meta, common, is_best)

    @contextlib.contextmanager
    def _failures_named(self, tmp: Path, final_name: str) -> Iterator[None]:
        """A failed DCP write (every rank sees it: DCP reduces the ranks' errors) as one clear error;
        the temporary directory goes (rank 0), ``latest`` still names the previous checkpoint."""
        try:
            yield
        except BaseException as exc:  # DCP's CheckpointException derives from BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = read_pointer(self.directory, LATEST_POINTER)
            kept = f" The previous checkpoint ({previous}) and the 'latest' pointer are intact." if previous else ""
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise CheckpointError(
                f"could not write sharded checkpoint {self.directory / final_name}: {first_line}.{kept} "
                "Check free disk space (lower checkpoint.keep_last) and that the filesystem is healthy."
            ) from exc

    def _own_files(self, tmp: Path) -> list[Path]:
        """The files this rank wrote: its DCP shards, its rank file (rank 0: also metadata and common)."""
        own = [p for p in tmp.glob(f"__{self.rank}_*.distcp")] + [tmp / rank_file_name(self.rank)]
        if self.rank == 0:
            own += [tmp / ".metadata", tmp / COMMON_NAME]
        return own

    def _finish(self, tmp: Path, meta: dict[str, Any], common: dict[str, Any], is_best: bool) -> Path | None:
        own = self._own_files(tmp)
        for path in own:
            fsync_file(path)  # DCP fsyncs its files; the rank files and a rename of .metadata need it too
        entries = {p.name: dict(zip(("size", "sha256"), hash_file(p), strict=True)) for p in own}
        _fault_point("after_shards", self.rank, self._saves, self.directory.parent)
        gathered = gather_objects_to_rank_zero(
            entries, group=self.group
        )  # every rank's files are durable and hashed once this returns
        if self.rank != 0:
            return None
        assert gathered is not None
        files: dict[str, Any] = {}
        for rank_entries in gathered:
            files.update(rank_entries)
        final = self.directory / meta["name"]
        previous = read_pointer(self.directory, LATEST_POINTER)
        try:
            manifest = {
                **{k: common.get(k) for k in _COMMON_META_KEYS},
                **meta,
                "format": SHARDED_FORMAT,
                "format_version": SHARDED_FORMAT_VERSION,  # of this layout; common.pt holds the state's own
                "created": time.time(),
                "files": files,
            }
            atomic_write_text(tmp / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            fsync_dir(tmp)
            _fault_point("before_publish", self.rank, self._saves, self.directory.parent)
            os.rename(tmp, final)
            fsync_dir(self.directory)
            write_pointer(self.directory, LATEST_POINTER, final.name)
            if is_best:
                write_pointer(self.directory, BEST_POINTER, final.name)
        except OSError as exc:
            kept = f"The previous checkpoint ({previous}) and the 'latest' pointer are intact." if previous else ""
            raise CheckpointError(
                f"could not write sharded checkpoint {final}: {exc.strerror or exc} (errno {exc.errno}). {kept} "
                "Free disk space, lower checkpoint.keep_last, or check that the filesystem is healthy."
            ) from None
        self._prune(keep={final.name})
        return final

    def _prune(self, keep: set[str]) -> None:
        """Keep the newest ``keep_last`` complete directories, and the ones ``latest``/``best`` name."""
        protected = keep | {
            n for n in (read_pointer(self.directory, LATEST_POINTER), read_pointer(self.directory, BEST_POINTER)) if n
        }
        complete_seen = 0
        for path in sharded_checkpoint_dirs(self.directory):
            complete = (path / MANIFEST_NAME).is_file()
            complete_seen += complete
            if path.name in protected or (complete and (self.keep_last == 0 or complete_seen <= self.keep_last)):
                continue
            try:
                (path / MANIFEST_NAME).unlink(missing_ok=True)  # first: a half-deleted directory reads as incomplete
                shutil.rmtree(path)
            except OSError as exc:
                log.warning("could not remove old checkpoint %s: %s", path, exc.strerror)

    def wait(self) -> Path | None:
        return self._background.wait()

    def close(self) -> None:
        try:
            self._background.close()
        finally:
            if self._stager is not None:
                self._stager.close()
                self._stager = None


_COMMON_META_KEYS = (
    "reason",
    "epoch_complete",
    "world_size",
    "dtrain_version",
    "torch_version",
    "config",
)


def _torch_save_durably(obj: Any, path: Path) -> None:
    with open(path, "xb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------------------ reading


def _load_pt(path: Path) -> Any:
    return torch_load_safely(path, "cpu")


def read_sharded_state(path: Path, *, verify: bool = True, for_rank: tuple[int, int] | None = None) -> dict[str, Any]:
    """Everything but the model and optimizer tensors: the common state plus the ranks' own states.

    ``for_rank = (rank, world_size)``: when the checkpoint has that world size only this rank's own
    state is read (the others are None); otherwise all of them (a new world size merges them)."""
    path = Path(path)
    if verify:
        problem = verify_sharded_checkpoint(path)
        if problem is not None:
            raise CheckpointError(
                f"checkpoint {path} failed verification: {problem}. Resume from an older checkpoint "
                "(a run directory picks the newest valid one)."
            )
    common = _load_pt(path / COMMON_NAME)
    if not isinstance(common, dict):
        raise CheckpointError(f"{path / COMMON_NAME} is not a dtrain checkpoint dict.")
    world = int(common.get("world_size") or 1)
    wanted = range(world) if for_rank is None or for_rank[1] != world else [for_rank[0]]
    common["rank_states"] = [_load_pt(path / rank_file_name(r)) if r in wanted else None for r in range(world)]
    return common


def load_sharded_model_and_optimizer(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rest: dict[str, Any], *, group: Any = None
) -> None:
    """Collective: every rank reads the parts of every shard it now owns (any world size) and loads them.
    ``group``: a gloo group for DCP's collectives (None: the default group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    tensors, _ = split_tensors({"model": model_sd, "optimizer": optim_sd})
    dcp.load(tensors, storage_reader=_safe_reader(path), process_group=group)
    full = merge_tensors(tensors, rest)
    set_state_dict(model, optimizer, model_state_dict=full["model"], optim_state_dict=full["optimizer"])


def load_sharded_model(path: Path, model: torch.nn.Module, rest: dict[str, Any], *, group: Any = None) -> None:
    """Collective: the model's part of a sharded checkpoint only (any world size), optimizer untouched.
    ``group``: a gloo group for DCP's collectives (None: the default group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    tensors, _ = split_tensors({"model": get_model_state_dict(model)})
    dcp.load(tensors, storage_reader=_safe_reader(path), process_group=group)
    full = merge_tensors(tensors, {"model": rest.get("model", {})})
    set_model_state_dict(model, full["model"])


def consolidate(path: Path, *, optimizer: bool = False, verify: bool = True) -> dict[str, Any]:
    """The checkpoint as one single-file-style dict in this process (no process group): model (and
    optimizer) tensors gathered from all shards, plus the common state. For export, eval and inspect."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    state = read_sharded_state(path, verify=verify)
    rest = state.pop("model_and_optimizer_rest", {})
    keys = {"model", "optimizer"} if optimizer else {"model"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: loading into this process" is the point here
        tensors = _load_state_dict_from_keys(keys, storage_reader=_safe_reader(Path(path)))
    merged = merge_tensors(tensors, {k: v for k, v in rest.items() if k in keys})
    state.update(merged)
    return state
