"""What the trainer calls: :func:`build_data` and :func:`make_loader` (torch)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Sampler

from dist_train.config import Config, DataConfig
from dist_train.data.dataset import H5Split, PackedBatch
from dist_train.data.preflight import normalization_for, prepare_splits
from dist_train.data.transforms import BatchTransforms
from dist_train.errors import ConfigError


@dataclass
class DataBundle:
    train: H5Split
    val: H5Split | None
    test: H5Split | None
    sample_shape: tuple[int, ...]  # one x sample as the model sees it (after transforms)
    num_classes: int


def build_data(cfg: Config, *, run_dir: Path | None) -> DataBundle:
    """Validate the data, make the splits and load (or compute) the normalisation statistics.

    With ``run_dir`` set, ``normalize = "auto"`` statistics are read from / written to
    ``run_dir/normalization.json``; with None they are computed and not stored.
    """
    d = cfg.data
    info, splits = prepare_splits(cfg)
    stats = normalization_for(cfg, info, splits, run_dir)
    mean, std = stats if stats is not None else (None, None)

    def split(name: str, rows: Any, transforms: list[str]) -> H5Split:
        return H5Split(
            info.path,
            rows,
            x_key=d.x_key,
            y_key=d.y_key,
            extra_keys=d.extra_keys,
            mean=mean,
            std=std,
            transforms=transforms,
            name=name,
        )

    train = split("train", splits.train, d.train_transforms)
    val = split("val", splits.val, d.eval_transforms) if splits.val is not None else None
    test = split("test", splits.test, d.eval_transforms) if splits.test is not None else None
    return DataBundle(train, val, test, _model_input_shape(d, info.sample_shape), cfg.model.num_classes)


def _model_input_shape(d: DataConfig, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
    train_shape = BatchTransforms(d.train_transforms, "data.train_transforms").output_shape(sample_shape)
    eval_shape = BatchTransforms(d.eval_transforms, "data.eval_transforms").output_shape(sample_shape)
    if train_shape != eval_shape:
        raise ConfigError(
            f"data.train_transforms give samples of shape {train_shape} but data.eval_transforms give {eval_shape}; "
            "the model needs one input shape. Add a matching crop/resize to eval_transforms (e.g. CenterCrop)."
        )
    return train_shape


def make_loader(
    split: H5Split, batch_sampler: Sampler[Any], cfg: DataConfig, *, train: bool, device_type: str
) -> DataLoader:  # type: ignore[type-arg]
    """A DataLoader that hands each whole IndexBatch to the split (``batch_size=None``)."""
    transforms = cfg.train_transforms if train else cfg.eval_transforms
    where = "data.train_transforms" if train else "data.eval_transforms"
    dataset = split.with_transforms(transforms, where)
    dataset.pack_in_workers = cfg.num_workers > 0
    kwargs: dict[str, Any] = {
        "batch_size": None,
        "sampler": batch_sampler,
        "num_workers": cfg.num_workers,
        "pin_memory": bool(cfg.pin_memory and device_type == "cuda"),
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

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            yield batch.unpack() if isinstance(batch, PackedBatch) else batch
