"""Checkpoint files that survive crashes, full disks and kills: atomic writes, sha256 sidecars, safe loads.

Layout of a checkpoint directory (``<run_dir>/checkpoints/``)::

    ckpt-e0003-s00001200.pt              the state dict (torch.save zip format)
    ckpt-e0003-s00001200.pt.sha256.json  its size + sha256, written atomically AFTER the data file
    best.pt, best.pt.sha256.json         a hard link (or copy) of the best checkpoint
    latest                               text: name of the newest complete checkpoint
    .<name>.<random>.tmp                 a write in progress (or left by a killed writer); readers ignore it

A checkpoint is valid only when its sidecar exists and the file's size and sha256 match it, so a torn
write, a truncated file or flipped bytes are detected before anything is loaded. Files that ``latest``
ever named are never rewritten in place: a second save at the same (epoch, step) gets a ``-1`` suffix.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import torch

from dist_train.checkpoint.background import BackgroundWriter
from dist_train.checkpoint.layout import (
    BEST_NAME,
    FORMAT_VERSION,
    LATEST_POINTER,
    checkpoint_files,
    checkpoint_name,
    hash_file,
    make_checkpoint_directory,
    read_pointer,
    sidecar_path,
    write_pointer,
)
from dist_train.errors import CheckpointError
from dist_train.fsutil import atomic_replace, atomic_write_text

log = logging.getLogger("dtrain.checkpoint")  # under "dtrain": the run's log files and console get it

# Large tensor records are written (and hashed) in slices so memory stays flat and a kill lands mid-file.
WRITE_CHUNK_BYTES = 8 << 20

# A real pickled object names "module.Class"; garbage bytes can also trip this message, with junk for a name.
_PICKLED_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([A-Za-z_][\w.]*\.[A-Za-z_]\w*)")
# Exactly these leaf types load back under torch.load(weights_only=True); subclasses (numpy scalars) do not.
_PLAIN_LEAF_TYPES = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


# --------------------------------------------------------------------------------------------- verification


def read_sidecar(path: Path) -> dict[str, Any]:
    """The sidecar of ``path``; raises ValueError with a short reason when it is missing or unreadable."""
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no checksum file {side.name} (the write did not finish, or not written by dtrain)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"checksum file {side.name} is unreadable ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or not isinstance(meta.get("size"), int):
        raise ValueError(f"checksum file {side.name} lacks size/sha256")
    if meta.get("file") != path.name:
        raise ValueError(f"checksum file {side.name} describes {meta.get('file')!r}, not {path.name}")
    return meta


def verify_checkpoint(path: Path, *, deep: bool = True) -> str | None:
    """None when ``path`` matches its sidecar; otherwise why not. ``deep=False`` checks the size only."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "file does not exist"
    except OSError as exc:
        return f"cannot stat the file ({exc.strerror})"
    try:
        meta = read_sidecar(path)
    except ValueError as exc:
        return str(exc)
    if size != meta["size"]:
        return f"size is {size} bytes but {meta['size']} were written (truncated or replaced)"
    if deep:
        try:
            _, actual = hash_file(path)
        except OSError as exc:
            return f"cannot read the file ({exc.strerror})"
        if actual != meta["sha256"]:
            return f"sha256 mismatch (file {actual[:12]}…, recorded {meta['sha256'][:12]}…): the bytes are corrupt"
    return None


# ------------------------------------------------------------------------------------------ state snapshots


def _describe_key(keypath: tuple[Any, ...]) -> str:
    return "state" + "".join(f"[{k!r}]" for k in keypath)


def _unsupported_leaf(value: Any, keypath: tuple[Any, ...]) -> CheckpointError:
    return CheckpointError(
        f"cannot checkpoint {_describe_key(keypath)}: a {type(value).__module__}.{type(value).__qualname__} is not "
        "a plain container, number, string or tensor, so the file could not be loaded back with "
        "torch.load(weights_only=True). Convert it in the state_dict (e.g. float(x), x.tolist(), torch.from_numpy(x))."
    )


def _check_tensor(value: torch.Tensor, keypath: tuple[Any, ...]) -> None:
    if type(value) not in (torch.Tensor, torch.nn.Parameter):
        raise _unsupported_leaf(value, keypath)


class StagingArea:
    """CPU buffers an async save copies tensors into, reused by the next save of the same shapes.

    Most of a fresh copy's time is the page faults of touching new memory, so keeping the buffers
    makes every save after the first one a plain memcpy (pinned for CUDA sources, so the
    device-to-host copies run at full speed). Reuse is safe because a save first waits for the
    previous write to finish. Costs one checkpoint's worth of host memory while the manager lives.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.UntypedStorage] = []
        self._used = 0
        self._copied: dict[tuple[str, int], torch.UntypedStorage] = {}
        self._from_cuda = False

    def begin(self) -> None:
        self._used = 0
        self._copied = {}
        self._from_cuda = False

    def finish(self) -> None:
        del self._buffers[self._used :]  # shapes changed: drop what this save did not use
        self._copied = {}
        if self._from_cuda:
            torch.cuda.synchronize()  # the non-blocking device-to-host copies must land before the write

    def _buffer_like(self, storage: torch.UntypedStorage, pinned: bool) -> torch.UntypedStorage:
        index = self._used
        self._used += 1
        if index < len(self._buffers):
            candidate = self._buffers[index]
            if candidate.nbytes() == storage.nbytes() and candidate.is_pinned() == pinned:
                return candidate
        fresh = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pinned).untyped_storage()
        if index < len(self._buffers):
            self._buffers[index] = fresh
        else:
            self._buffers.append(fresh)
        return fresh

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU copy; views of one storage share one copied storage, as torch.save would store them."""
        tensor = tensor.detach()
        if tensor.layout != torch.strided or tensor.is_conj() or tensor.is_neg():
            return tensor.to("cpu", copy=True)
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        copied = self._copied.get(key)
        if copied is None:
            from_cuda = tensor.device.type == "cuda"
            self._from_cuda |= from_cuda
            copied = self._buffer_like(storage, pinned=from_cuda)
            copied.copy_(storage, non_blocking=from_cuda)
            self._copied[key] = copied
        out = torch.empty(0, dtype=tensor.dtype)
        out.set_(copied, tensor.storage_offset(), tensor.size(), tensor.stride())
        return out


def _plain_leaf(obj: Any, keypath: tuple[Any, ...]) -> Any:
    """``obj`` as a type the safe loader accepts; subclasses (torch.__version__, numpy.float64) become the base type."""
    if type(obj) in _PLAIN_LEAF_TYPES:
        return obj
    for base in (bool, int, float, str):
        if isinstance(obj, base):
            return base(obj)
    raise _unsupported_leaf(obj, keypath)


def _plain_copy(obj: Any, staging: StagingArea | None, keypath: tuple[Any, ...]) -> Any:
    if isinstance(obj, torch.Tensor):
        _check_tensor(obj, keypath)
        return staging.copy(obj) if staging is not None else obj
    if type(obj) in (dict, OrderedDict):
        copied = type(obj)()
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise _unsupported_leaf(key, keypath)
            copied[key] = _plain_copy(value, staging, (*keypath, key))
        return copied
    if type(obj) in (list, tuple):
        return type(obj)(_plain_copy(value, staging, (*keypath, i)) for i, value in enumerate(obj))
    return _plain_leaf(obj, keypath)


def snapshot_state(obj: Any, staging: StagingArea | None = None) -> Any:
    """A copy of ``obj``'s containers holding only what ``torch.load(weights_only=True)`` reads back.

    With ``staging`` every tensor is copied into CPU memory, so training may mutate the originals right
    away (async saves); without, the tensors themselves are kept (synchronous saves). Anything the safe
    loader would reject at resume time is refused now, naming its key.
    """
    if staging is None:
        return _plain_copy(obj, None, ())
    staging.begin()
    try:
        return _plain_copy(obj, staging, ())
    finally:
        staging.finish()


# -------------------------------------------------------------------------------------------- atomic writing


class _HashingWriter:
    """File-like sink for torch.save: hashes the bytes as they go to disk, so nothing is re-read."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._digest = hashlib.sha256()
        self.size = 0
        # torch.save's C++ writer swallows an exception raised here and fails later with an opaque
        # "unexpected pos"; the first real error (ENOSPC, EIO, an injected one) is kept to be re-raised.
        self.error: BaseException | None = None

    def write(self, data: Any) -> int:
        if self.error is not None:
            raise self.error
        view = memoryview(data).cast("B")
        try:
            for start in range(0, len(view), WRITE_CHUNK_BYTES):
                self._write_chunk(view[start : start + WRITE_CHUNK_BYTES])
        except BaseException as exc:
            self.error = exc
            raise
        return len(view)

    def _write_chunk(self, chunk: memoryview) -> None:
        self._digest.update(chunk)
        self._fh.write(chunk)
        self.size += len(chunk)

    def flush(self) -> None:
        self._fh.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _disk_full_hint(directory: Path) -> str:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**20:.1f} MiB free on that filesystem"


def _write_failed(path: Path, exc: OSError, previous: str | None) -> CheckpointError:
    reason = exc.strerror or os.strerror(exc.errno or 0) or str(exc)
    kept = (
        f"The previous checkpoint ({previous}) and the 'latest' pointer are intact."
        if previous
        else ("No earlier checkpoint exists in that directory.")
    )
    advice = "Free disk space, lower checkpoint.keep_last, or write the run to a larger filesystem (run.output_dir)."
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        advice = "Check that the directory is writable and the filesystem healthy."
    return CheckpointError(
        f"could not write checkpoint {path}: {reason} (errno {exc.errno}; {_disk_full_hint(path.parent)}). "
        f"{kept} {advice}"
    )


def _write_data_file(final: Path, produce: Callable[[_HashingWriter], None]) -> tuple[int, str]:
    """Write through ``fsutil.atomic_replace`` (temp file, fsync, rename, dir fsync); (size, sha256) of what was written."""
    with atomic_replace(final) as tmp, open(tmp, "wb") as fh:
        writer = _HashingWriter(fh)
        try:
            produce(writer)
        except BaseException as exc:
            if writer.error is not None and writer.error is not exc:
                raise writer.error from None
            raise
    return writer.size, writer.hexdigest()


def _write_sidecar(final: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(sidecar_path(final), json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _move_latest_pointer(directory: Path, name: str) -> None:
    write_pointer(directory, LATEST_POINTER, name)


def _link_or_copy_atomically(source: Path, final: Path) -> None:
    """``final`` becomes the same bytes as ``source`` in one rename (a hard link when the filesystem allows)."""
    with atomic_replace(final) as tmp:
        tmp.unlink()  # os.link needs a free name; the temporary name stays ours (a private run directory)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


# ------------------------------------------------------------------------------------------- safe loading


def torch_load_safely(path: Path, map_location: str, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = _PICKLED_GLOBAL_RE.search(str(exc))
        if found:
            raise CheckpointError(
                f"refusing to load {path}: it contains a pickled Python object ({found.group(1).rstrip('.')}), "
                "and unpickling can run arbitrary code. Checkpoints written by dtrain hold only tensors and plain "
                "containers; re-save the file with plain state_dicts, or load it yourself only if you trust its source."
            ) from None
        raise CheckpointError(f"{path} is not a valid checkpoint (corrupt or not written by torch.save).") from None
    except Exception as exc:
        # Garbage bytes can break the unpickler anywhere (IndexError, KeyError, struct.error, ...), so every
        # failure of torch.load means "not a checkpoint". torch's messages run to several sentences of advice;
        # its first sentence says what broke.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first_line = first_line.split(". ")[0].rstrip(".")
        raise CheckpointError(
            f"{path} is not a valid checkpoint (corrupt, truncated or not a torch.save file): {first_line}."
        ) from None


def _check_format(path: Path, state: Any) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dtrain checkpoint dict.")
    version = state.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version {version!r}; this dtrain reads up to {FORMAT_VERSION}. "
            "Upgrade dtrain to load it."
        )
    return state


def load_checkpoint(path: Path, *, map_location: str = "cpu", verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint file with ``torch.load(weights_only=True)``, after checking its sha256 sidecar."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}; pass a checkpoint file (ckpt-*.pt or best.pt).")
    if verify:
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointError(
                f"checkpoint {path} failed verification: {problem}. Resume from an older checkpoint "
                "(checkpoint.catalog.latest_valid_checkpoint() picks one), or load with verify=False if you trust the file."
            )
    return _check_format(path, torch_load_safely(path, map_location))


# --------------------------------------------------------------------------------------------- the manager


class CheckpointManager:
    """Rank 0's writer of one checkpoint directory: atomic saves, retention, ``best.pt``, a ``latest`` pointer.

    With ``async_save`` the state is copied to CPU memory inside ``save()`` and written by one background
    thread; at most one save is in flight, and a background failure is raised by the next call.
    """

    def __init__(self, directory: Path, *, keep_last: int = 3, async_save: bool = False) -> None:
        if keep_last < 0:
            raise CheckpointError(f"checkpoint.keep_last must be >= 0 (0 keeps all), got {keep_last}.")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.async_save = async_save
        self._background: BackgroundWriter[Path] = BackgroundWriter()
        self._staging = StagingArea() if async_save else None

    # ---- writing

    def save(
        self,
        state: dict[str, Any],
        *,
        epoch: int,
        step: int,
        metrics: dict[str, float] | None = None,
        is_best: bool = False,
    ) -> Path:
        self.wait()  # one save in flight at most; also surfaces the previous background error
        self._ensure_directory()
        final = self._free_name(epoch, step)
        meta = {
            "file": final.name,
            "epoch": int(epoch),
            "step": int(step),
            "metrics": {str(k): float(v) for k, v in (metrics or {}).items()},
            "format_version": FORMAT_VERSION,
        }
        snapshot = snapshot_state(state, self._staging)
        if not self.async_save:
            return self._write_checkpoint(snapshot, final, meta, is_best)
        self._background.submit(self._write_checkpoint, snapshot, final, meta, is_best)
        return final

    def wait(self) -> None:
        self._background.wait()  # re-raises the background write's CheckpointError

    def close(self) -> None:
        self._background.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_directory(self) -> None:
        make_checkpoint_directory(self.directory)
        if not os.access(self.directory, os.W_OK):
            raise CheckpointError(
                f"checkpoint directory {self.directory} is not writable; pick another run.output_dir."
            )

    def _free_name(self, epoch: int, step: int) -> Path:
        """A name no earlier save used: a file ``latest`` may name must never be rewritten in place."""
        duplicate = 0
        while (self.directory / checkpoint_name(epoch, step, duplicate)).exists():
            duplicate += 1
        return self.directory / checkpoint_name(epoch, step, duplicate)

    def _write_checkpoint(self, state: dict[str, Any], final: Path, meta: dict[str, Any], is_best: bool) -> Path:
        self._remove_stale_temp_files()
        previous = self._read_pointer()
        try:
            size, sha256 = _write_data_file(final, lambda sink: torch.save(state, cast(IO[bytes], sink)))
            try:
                _write_sidecar(final, {**meta, "size": size, "sha256": sha256, "created": time.time()})
            except BaseException:
                final.unlink(missing_ok=True)  # unverifiable data is useless; never leave it to be mistaken
                raise
            _move_latest_pointer(self.directory, final.name)
            if is_best:
                self._write_best(final, meta, size, sha256)
        except OSError as exc:
            raise _write_failed(final, exc, previous) from None
        self._prune(keep={final.name})
        return final

    def _write_best(self, source: Path, meta: dict[str, Any], size: int, sha256: str) -> None:
        best = self.directory / BEST_NAME
        # Drop the old sidecar first: a kill mid-update leaves best.pt unverified, never wrongly verified.
        sidecar_path(best).unlink(missing_ok=True)
        _link_or_copy_atomically(source, best)
        _write_sidecar(
            best,
            {**meta, "file": BEST_NAME, "source": source.name, "size": size, "sha256": sha256, "created": time.time()},
        )

    def _remove_stale_temp_files(self) -> None:
        for tmp in self.directory.glob(".*.tmp"):
            try:
                tmp.unlink()
                log.info("removed %s, left by an interrupted checkpoint write", tmp)
            except OSError:
                pass

    def _prune(self, keep: set[str]) -> None:
        """Keep the newest ``keep_last`` complete checkpoints, the one ``latest`` names, and ``keep``."""
        pointed = self._read_pointer()
        complete_seen = 0
        for path in checkpoint_files(self.directory):
            complete = sidecar_path(path).exists()
            if complete:
                complete_seen += 1
            protected = path.name in keep or path.name == pointed
            if protected or (complete and (self.keep_last == 0 or complete_seen <= self.keep_last)):
                continue
            for victim in (sidecar_path(path), path):  # sidecar first: a half-pruned file reads as incomplete
                try:
                    victim.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("could not remove old checkpoint file %s: %s", victim, exc.strerror)

    def _read_pointer(self) -> str | None:
        return read_pointer(self.directory, LATEST_POINTER)


# ------------------------------------------------------------------------------------------ model export

# The sidecar of an exported model says so; a checkpoint's sidecar has no "format".
MODEL_EXPORT_FORMAT = "dtrain-model-export"
_EXPORT_META_KEYS = ("epoch", "step", "epoch_complete", "world_size", "dtrain_version", "torch_version", "config")


def export_state(state: dict[str, Any], source: Path, out: Path) -> Path:
    """The model weights of a loaded checkpoint ``state`` as one file holding exactly the model's
    state_dict (``model.load_state_dict(torch.load(out, weights_only=True))``), written atomically.
    Config, position and metrics go to its sidecar ``OUT.sha256.json`` (with size and sha256), from
    which ``dtrain eval OUT`` rebuilds data and model."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = snapshot_state(state["model"])
    size, sha256 = _write_data_file(out, lambda sink: torch.save(weights, cast(IO[bytes], sink)))
    meta = {
        "file": out.name,
        "format": MODEL_EXPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        **{key: state.get(key) for key in _EXPORT_META_KEYS},
        "metrics": {str(k): float(v) for k, v in (state.get("metrics") or {}).items()},
        "size": size,
        "sha256": sha256,
        "created": time.time(),
        "source": str(source),
    }
    _write_sidecar(out, meta)
    return out


def _export_metadata(path: Path) -> dict[str, Any] | None:
    """The sidecar of an exported model file; None for a checkpoint (or no readable sidecar)."""
    try:
        meta = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == MODEL_EXPORT_FORMAT else None


def _as_checkpoint_state(weights: Any, meta: dict[str, Any] | None) -> dict[str, Any]:
    """An exported model's weights with its sidecar's metadata, shaped like a checkpoint's state."""
    if meta is None:
        return weights  # a checkpoint: already shaped so
    fields = {key: meta.get(key) for key in (*_EXPORT_META_KEYS, "metrics", "format_version")}
    return {**fields, "reason": "export", "model": weights}


def load_file_for_reading(path: Path, *, verify: bool = True) -> dict[str, Any]:
    """A checkpoint file, or an exported model with the config and position its sidecar holds."""
    path = Path(path)
    return _as_checkpoint_state(load_checkpoint(path, map_location="cpu", verify=verify), _export_metadata(path))


def load_file_unverified(path: Path) -> dict[str, Any]:
    """A checkpoint file or exported model, memory-mapped and not checked against its sidecar (inspection
    reports the check's result beside what the file holds)."""
    path = Path(path)
    return _as_checkpoint_state(_check_format(path, torch_load_safely(path, "cpu", mmap=True)), _export_metadata(path))
