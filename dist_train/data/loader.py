"""What the trainer calls: :func:`build_data` and :func:`make_loader` (torch).

Which loader ``make_loader`` builds is chosen by ``data.worker_mode`` (default ``"auto"``):

* ``"auto"``: a split whose per-batch reads are all memmap gathers (contiguous, uncompressed
  datasets: the "fast path" of :mod:`dist_train.data.h5io`) and that has no random transforms is
  loaded in-process (:class:`~dist_train.data.prefetch.PrefetchLoader`): with ``num_workers = 0``
  in the calling thread, otherwise by ``num_workers`` threads (at most one per CPU this process
  may use, minus its own) reading up to ``prefetch_factor * num_workers`` batches (and at most
  64 MB of samples) ahead. A gather from the page cache costs far less
  than moving a batch between processes (about 1 ms here), and it releases the GIL. Everything
  else (chunked/compressed files, whose decompression holds the GIL; random per-sample transforms,
  which are Python loops) uses DataLoader worker processes, as with ``"process"``;
  with ``num_workers = 0`` every split is read in the calling thread without a DataLoader.
* ``"process"``: always a ``torch.utils.data.DataLoader`` (worker processes when ``num_workers > 0``).
* ``"thread"``: always the in-process loader, with threads when ``num_workers > 0`` (random
  transforms then run in the consuming thread, see :mod:`dist_train.data.prefetch`).

All three give the same batches in the same order (the sampler's), bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Sampler

from dist_train.config import Config, DataConfig, resolve_geometry_path
from dist_train.data.dataset import H5Split, PackedBatch
from dist_train.data.device_feed import DevicePrep
from dist_train.data.hits import hit_spec
from dist_train.data.prefetch import PrefetchLoader
from dist_train.data.preflight import normalization_for, prepare_splits, rows_fingerprint
from dist_train.data.targets import batch_keys, label_key, target_normalization_for
from dist_train.data.transforms import BatchTransforms
from dist_train.errors import ConfigError


@dataclass
class DataBundle:
    train: H5Split
    val: H5Split | None
    test: H5Split | None
    sample_shape: tuple[int, ...]  # one x sample as the model sees it (after transforms)
    num_classes: int
    # Per-sample shape and dtype of every other key in a batch (targets, model inputs, extra keys).
    key_specs: dict[str, tuple[tuple[int, ...], str]]
    # Regression targets' per-column (mean, std) for target_norm, or None.
    target_stats: tuple[list[float], list[float]] | None = None


def build_data(cfg: Config, *, run_dir: Path | None) -> DataBundle:
    """Validate the data, make the splits and load (or compute) the normalisation statistics.

    With ``run_dir`` set, ``normalize = "auto"`` statistics are read from / written to
    ``run_dir/normalization.json``; with None they are computed and not stored.
    """
    d = cfg.data
    info, splits = prepare_splits(cfg)
    stats = normalization_for(cfg, info, splits, run_dir)
    mean, std = stats if stats is not None else (None, None)
    target_stats = target_normalization_for(cfg, info.extra, splits.train, rows_fingerprint(splits.train), run_dir)
    hits = hit_spec(d, resolve_geometry_path(cfg))  # None: x is read as stored

    def split(name: str, rows: Any, transforms: list[str]) -> H5Split:
        return H5Split(
            info.path,
            rows,
            x_key=d.x_key,
            y_key=label_key(cfg),
            extra_keys=batch_keys(cfg),
            mean=mean,
            std=std,
            transforms=transforms,
            name=name,
            layout=d.layout,
            hits=hits,
        )

    train = split("train", splits.train, d.train_transforms)
    val = split("val", splits.val, d.eval_transforms) if splits.val is not None else None
    test = split("test", splits.test, d.eval_transforms) if splits.test is not None else None
    key_specs = {k: (tuple(v["shape"]), str(v["dtype"])) for k, v in info.extra.items()}
    return DataBundle(
        train, val, test, _model_input_shape(d, info.sample_shape), cfg.model.num_classes, key_specs, target_stats
    )


def _model_input_shape(d: DataConfig, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
    train_shape = BatchTransforms(d.train_transforms, "data.train_transforms").output_shape(sample_shape)
    eval_shape = BatchTransforms(d.eval_transforms, "data.eval_transforms").output_shape(sample_shape)
    if train_shape != eval_shape:
        raise ConfigError(
            f"data.train_transforms give samples of shape {train_shape} but data.eval_transforms give {eval_shape}; "
            "the model needs one input shape. Add a matching crop/resize to eval_transforms (e.g. CenterCrop)."
        )
    return train_shape


WORKER_MODES = ("auto", "process", "thread")


def make_loader(
    split: H5Split,
    batch_sampler: Sampler[Any],
    cfg: DataConfig,
    *,
    train: bool,
    device_type: str,
    channels_last: bool = False,
    defer_to_device: bool | None = None,
) -> H5Loader | PrefetchLoader:
    """An iterable of batch dicts in ``batch_sampler``'s order (see the module docstring for which).

    ``defer_to_device`` (default: see below): the loader's ``device_prep`` is the
    :class:`~dist_train.data.device_feed.DevicePrep` a :class:`~dist_train.data.device_feed.DeviceFeed`
    must apply after the copy (normalisation, the cast of narrow file dtypes, the channels-last
    permutation); None when the batches leave the host ready for the model. ``channels_last``: the
    model runs in ``torch.channels_last`` memory format (``[train] channels_last``).
    """
    transforms = cfg.train_transforms if train else cfg.eval_transforms
    where = "data.train_transforms" if train else "data.eval_transforms"
    dataset = split.with_transforms(transforms, where)
    pin = bool(cfg.pin_memory and device_type == "cuda")
    if defer_to_device is None:
        # On a GPU the device widens, permutes and normalises after the copy (fewer bytes read, pinned and
        # copied; no host pass over the batch). On the CPU the host's normalisation runs in the reader
        # threads, off the training thread, so it stays there (deferring measured 1.03-1.12x the host's
        # work, benchmarks/host_step.py)... except for a channels_last model on a channels-last file: the
        # stored batch viewed as (B, C, H, W) is already channels_last memory, so deferring replaces two
        # whole-batch copies (the host's permutation, then the feed's channels_last copy) by none (0.2-0.3x).
        defer_to_device = device_type == "cuda" or (channels_last and dataset.stored_batch_is_channels_last())
    prep = dataset.defer_to_device() if defer_to_device else None
    loader = _loader(dataset, batch_sampler, cfg, pin)
    loader.device_prep = prep
    return loader


def _loader(dataset: H5Split, batch_sampler: Sampler[Any], cfg: DataConfig, pin: bool) -> H5Loader | PrefetchLoader:
    if use_threads(dataset, cfg):
        dataset.prepare_in_this_process()
        return PrefetchLoader(
            lambda index_batch, buffers: dataset.plan(
                index_batch, buffers.get(dataset.raw_x_shape(index_batch), dataset.x_dtype())
            ),
            dataset.gather,
            dataset.finish_in_consumer if dataset.defers_random_transforms else None,
            batch_sampler,
            num_threads=reader_threads(cfg.num_workers),
            depth=max(1, cfg.prefetch_factor) * max(1, cfg.num_workers),
            pin_memory=pin,
            name=dataset.name,
        )
    return _process_loader(dataset, batch_sampler, cfg, pin)


def reader_threads(num_workers: int) -> int:
    """``num_workers``, but at most one thread per CPU this process may use besides its own."""
    if num_workers <= 0:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(num_workers, cpus - 1))


def worker_mode(cfg: DataConfig) -> str:
    mode = getattr(cfg, "worker_mode", "auto")
    if mode not in WORKER_MODES:
        raise ConfigError(
            f'data.worker_mode = {mode!r} is not one of {", ".join(map(repr, WORKER_MODES))}. Use "auto" '
            '(threads for contiguous uncompressed files, worker processes otherwise), "process" or "thread".'
        )
    return str(mode)


def use_threads(dataset: H5Split, cfg: DataConfig) -> bool:
    """Whether ``dataset`` is loaded in this process (threads or inline) rather than by a DataLoader."""
    mode = worker_mode(cfg)
    if mode != "auto":
        return mode == "thread"
    if cfg.num_workers == 0:
        return True  # no workers: the same reads, minus the DataLoader's per-batch bookkeeping
    if dataset.defers_random_transforms:
        return False
    fast = dataset.on_fast_path()
    if not fast:
        dataset.close()  # the check opened the file; worker processes open their own
    return fast


def _process_loader(dataset: H5Split, batch_sampler: Sampler[Any], cfg: DataConfig, pin: bool) -> H5Loader:
    """A DataLoader that hands each whole IndexBatch to the split (``batch_size=None``)."""
    dataset.pack_in_workers = cfg.num_workers > 0
    kwargs: dict[str, Any] = {
        "batch_size": None,
        "sampler": batch_sampler,
        "num_workers": cfg.num_workers,
        "pin_memory": pin,
        # The split already returns tensors; default_convert would only walk the dict again.
        "collate_fn": keep_batch,
    }
    if cfg.num_workers > 0:
        kwargs["prefetch_factor"] = max(1, cfg.prefetch_factor)
        kwargs["persistent_workers"] = cfg.persistent_workers
        if cfg.start_method:
            kwargs["multiprocessing_context"] = cfg.start_method
    return H5Loader(dataset, **kwargs)


def keep_batch(batch: Any) -> Any:
    return batch


class H5Loader(DataLoader):  # type: ignore[type-arg]
    """A DataLoader that turns the one-buffer batches of its workers back into dicts of tensors."""

    device_prep: DevicePrep | None = None  # set by make_loader

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            yield batch.unpack() if isinstance(batch, PackedBatch) else batch
