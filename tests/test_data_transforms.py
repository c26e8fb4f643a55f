"""Transform strings: safe parsing, per-batch seeding, shapes, normalisation after transforms."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dist_train.config import Config
from dist_train.data.loader import build_data, make_loader
from dist_train.data.transform_spec import parse_transform
from dist_train.data.transforms import BatchTransforms
from dist_train.errors import ConfigError
from dist_train.sampler import ResumableDistributedBatchSampler


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('true')",
        "os.system('true')",
        "RandomCrop(size)",
        "RandomCrop(24) + 1",
        "Lambda(print)",
        "RandomCrop(*[24])",
        "RandomCrop(**{'size': 24})",
        "RandomCrop(open('x'))",
        "RandomCrop(24",
        "Compose([RandomCrop(24)])",
    ],
)
def test_parser_rejects_unsafe_or_unknown(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_transform(text, "data.train_transforms[0]")
    assert repr(text) in str(err.value)


def test_parser_accepts_literal_calls() -> None:
    spec = parse_transform("RandomCrop(24, padding=(2, 2), pad_if_needed=True)")
    assert spec.name == "RandomCrop" and spec.args == (24,) and dict(spec.kwargs)["padding"] == (2, 2)
    assert spec.is_random and not parse_transform("CenterCrop(24)").is_random


def test_seeded_random_crop_is_reproducible_and_per_sample() -> None:
    x = torch.arange(8 * 1 * 28 * 28, dtype=torch.float32).reshape(8, 1, 28, 28)
    t = BatchTransforms(["RandomCrop(24)", "RandomHorizontalFlip()"])
    torch.manual_seed(1)
    a = t(x.clone(), seed=123)
    torch.manual_seed(2)  # the global RNG state must not matter
    b = t(x.clone(), seed=123)
    c = t(x.clone(), seed=124)
    assert a.shape == (8, 1, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)
    # Each sample gets its own crop: top-left values differ in offset pattern across the batch.
    offsets = {int(a[i, 0, 0, 0].item() - x[i].min().item()) for i in range(8)}
    assert len(offsets) > 1


def test_transform_does_not_touch_global_rng() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    BatchTransforms(["RandomCrop(4)"])(torch.zeros(2, 1, 8, 8), seed=5)
    assert torch.equal(torch.rand(3), expected)


def make_images(path: Path, n: int = 64) -> Path:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["event_data"] = rng.uniform(0, 255, (n, 2, 12, 12)).astype(np.float32)
        f["labels"] = rng.integers(0, 4, n)
    return path


def test_transforms_in_loader_are_worker_independent(tmp_path: Path) -> None:
    cfg = Config()
    cfg.data.path = str(make_images(tmp_path / "img.h5"))
    cfg.data.train_transforms = ["RandomCrop(8)", "RandomVerticalFlip()"]
    cfg.data.eval_transforms = ["CenterCrop(8)"]
    cfg.data.normalize = "auto"
    cfg.model.num_classes = 4
    bundle = build_data(cfg, run_dir=tmp_path / "run")
    assert bundle.sample_shape == (2, 8, 8)
    sampler = ResumableDistributedBatchSampler(len(bundle.train), num_replicas=1, rank=0, batch_size=8, seed=1)
    cfg.data.num_workers = 0
    serial = list(make_loader(bundle.train, sampler, cfg.data, train=True, device_type="cpu"))
    cfg.data.num_workers, cfg.data.persistent_workers, cfg.data.start_method = 2, False, "fork"
    parallel = list(make_loader(bundle.train, sampler, cfg.data, train=True, device_type="cpu"))
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["index"], b["index"])
    # Normalisation is applied after the crop, per channel, with the stored training stats.
    x = torch.cat([b["x"] for b in serial])
    assert x.shape[1:] == (2, 8, 8)
    assert abs(float(x.mean())) < 0.2 and abs(float(x.std()) - 1.0) < 0.2
    # The same batch without normalisation, then normalised by hand, equals the loader's output.
    first = next(iter(sampler))
    raw = bundle.train.with_transforms(cfg.data.train_transforms)
    raw.mean = raw.std = None
    mean = torch.tensor(bundle.train.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.train.std).view(1, -1, 1, 1)
    torch.testing.assert_close((raw[first]["x"] - mean) / std, serial[0]["x"])


def test_mismatched_train_and_eval_shapes_are_rejected(tmp_path: Path) -> None:
    cfg = Config()
    cfg.data.path = str(make_images(tmp_path / "img.h5"))
    cfg.data.train_transforms = ["RandomCrop(8)"]
    cfg.model.num_classes = 4
    with pytest.raises(ConfigError, match="eval_transforms"):
        build_data(cfg, run_dir=None)


def test_transforms_on_flat_samples_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "flat.h5"
    with h5py.File(path, "w") as f:
        f["event_data"] = np.zeros((20, 5), np.float32)
        f["labels"] = np.zeros(20, np.int64)
    cfg = Config()
    cfg.data.path = str(path)
    cfg.data.train_transforms = ["RandomHorizontalFlip()"]
    cfg.data.eval_transforms = ["RandomHorizontalFlip()"]
    with pytest.raises(ConfigError, match="C, H, W"):
        build_data(cfg, run_dir=None)
