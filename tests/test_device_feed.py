"""The last leg of a batch (dist_train/data/device_feed.py), on the CPU.

What a CUDA run leaves to the device (normalisation, the cast of narrow file dtypes, the permutation of
channels-last files) must give the batches the host path gives, bit for bit; the CPU path must not change
at all; ``[train] channels_last`` must reach the model and the inputs. The CUDA side stream itself is tested
in tests/test_gpu.py (it needs a GPU); here a recording fake checks the order of its calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from dist_train.config import Config, config_from_dict, load_config
from dist_train.data.device_feed import DeviceFeed, DevicePrep
from dist_train.data.loader import build_data, make_loader
from dist_train.distributed.comm import DistInfo
from dist_train.errors import ConfigError
from dist_train.sampler import ShardedEvalBatchSampler
from dist_train.trainer import Trainer

N = 96
SHAPE = (3, 6, 5)  # (C, H, W) as the model sees it
MEAN = [0.3, -1.7, 12.5]
STD = [0.7, 3.1, 9.0]  # not powers of two: a multiplication by 1/std would not give the host's bits
CPU = torch.device("cpu")


def write_h5(path: Path, dtype: str, layout: str) -> Path:
    rng = np.random.default_rng(1)
    values = rng.integers(-100, 200, (N, *SHAPE)) if dtype != "float32" else rng.standard_normal((N, *SHAPE)) * 10
    x = (np.clip(values, 0, 255) if dtype == "uint8" else values).astype(dtype)
    if layout == "channels_last":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    with h5py.File(path, "w") as f:
        f.create_dataset("event_data", data=x)
        f.create_dataset("labels", data=rng.integers(0, 3, N).astype(np.int64))
        f.create_dataset("energies", data=rng.uniform(0, 100, (N, 1)).astype(np.float32))
    return path


def config_for(path: Path, layout: str, **data: Any) -> Config:
    cfg = Config()
    cfg.data.path = str(path)
    cfg.data.layout = layout  # type: ignore[assignment]
    cfg.data.extra_keys = ["energies"]
    cfg.data.normalize = "given"
    cfg.data.mean, cfg.data.std = list(MEAN), list(STD)
    cfg.data.num_workers = 0
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def batches(
    cfg: Config, *, device_type: str = "cpu", defer: bool | None = None, channels_last: bool = False
) -> tuple[list[dict[str, torch.Tensor]], Any]:
    split = build_data(cfg, run_dir=None).train
    sampler = ShardedEvalBatchSampler(len(split), num_replicas=1, rank=0, batch_size=16)
    loader = make_loader(
        split,
        sampler,
        cfg.data,
        train=False,
        device_type=device_type,
        channels_last=channels_last,
        defer_to_device=defer,
    )
    return list(loader), loader.device_prep


def host_reference(path: Path, rows: np.ndarray, layout: str) -> torch.Tensor:
    """What main's host path makes of the rows: float32, (B, C, H, W), ``(x - mean) / std`` in float32."""
    with h5py.File(path, "r") as f:
        x = torch.from_numpy(f["event_data"][np.sort(rows)].astype(np.float32))
    x = x[torch.from_numpy(np.argsort(np.argsort(rows)))]  # back into the sampler's order
    if layout == "channels_last":
        x = x.permute(0, 3, 1, 2).contiguous()
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_cpu_path_is_the_host_path_unchanged(tmp_path: Path, dtype: str, layout: str) -> None:
    path = write_h5(tmp_path / "f.h5", dtype, layout)
    got, prep = batches(config_for(path, layout))
    assert prep is None  # nothing is left to a device on the CPU
    feed = DeviceFeed(CPU, prep)
    for batch in got:
        fed = feed(batch)
        assert all(fed[k] is batch[k] for k in batch)  # no copy, no conversion per step
        assert batch["x"].dtype == torch.float32 and batch["x"].is_contiguous()
        assert torch.equal(batch["x"], host_reference(path, batch["index"].numpy(), layout))


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float16", "float32"])
@pytest.mark.parametrize("worker_mode", ["auto", "process"])
def test_deferred_preparation_equals_the_host_path(tmp_path: Path, dtype: str, layout: str, worker_mode: str) -> None:
    path = write_h5(tmp_path / "f.h5", dtype, layout)
    cfg = config_for(path, layout, worker_mode=worker_mode)
    host, _ = batches(cfg)
    sent, prep = batches(cfg, defer=True)
    assert isinstance(prep, DevicePrep)
    # What leaves the host: the file's dtype when widening is exact, the stored axis order, no normalisation.
    assert sent[0]["x"].dtype == (torch.float32 if dtype == "float32" else getattr(torch, dtype))
    stored = (SHAPE[1], SHAPE[2], SHAPE[0]) if layout == "channels_last" else SHAPE
    assert tuple(sent[0]["x"].shape[1:]) == stored
    feed = DeviceFeed(CPU, prep)
    for want, batch in zip(host, sent, strict=True):
        got = feed(batch)
        assert got["x"].dtype == torch.float32 and got["x"].is_contiguous()
        assert torch.equal(got["x"], want["x"])  # bit for bit
        assert all(torch.equal(got[k], want[k]) for k in ("y", "index", "energies"))


def test_deferred_with_process_workers_and_transforms(tmp_path: Path) -> None:
    """With transforms the host permutes and transforms in float32 (they need (C, H, W) float samples); only the
    normalisation moves. Packed batches from worker processes carry the stored dtype."""
    path = write_h5(tmp_path / "f.h5", "uint8", "channels_last")
    cfg = config_for(path, "channels_last", worker_mode="process", num_workers=1)
    cfg.data.train_transforms = cfg.data.eval_transforms = ["CenterCrop(4)"]
    host, _ = batches(cfg)
    sent, prep = batches(cfg, defer=True)
    assert sent[0]["x"].dtype == torch.float32 and tuple(sent[0]["x"].shape[1:]) == (3, 4, 4)
    assert not torch.equal(sent[0]["x"], host[0]["x"])  # not normalised yet
    feed = DeviceFeed(CPU, prep)
    assert all(torch.equal(feed(b)["x"], w["x"]) for w, b in zip(host, sent, strict=True))

    plain = config_for(path, "channels_last", worker_mode="process", num_workers=1)
    sent, prep = batches(plain, defer=True)
    assert sent[0]["x"].dtype == torch.uint8  # the packed buffer holds the file's bytes
    assert all(torch.equal(DeviceFeed(CPU, prep)(b)["x"], w["x"]) for w, b in zip(batches(plain)[0], sent, strict=True))


def test_make_loader_defers_on_cuda_and_for_a_channels_last_model_on_a_channels_last_file(tmp_path: Path) -> None:
    first = config_for(write_h5(tmp_path / "chw.h5", "uint8", "channels_first"), "channels_first", pin_memory=False)
    assert batches(first, device_type="cuda")[1] is not None  # a loader for a GPU run (reads the same on the CPU)
    assert batches(first, device_type="cpu")[1] is None
    assert batches(first, device_type="cpu", channels_last=True)[1] is None  # the host's batch needs a copy anyway
    last = config_for(write_h5(tmp_path / "hwc.h5", "uint8", "channels_last"), "channels_last")
    assert batches(last, device_type="cpu")[1] is None
    # The stored batch viewed as (B, C, H, W) is channels_last memory: no permutation, no layout copy.
    host, _ = batches(last)
    sent, prep = batches(last, device_type="cpu", channels_last=True)
    assert prep is not None and sent[0]["x"].dtype == torch.uint8
    feed = DeviceFeed(CPU, prep, channels_last=True)
    for want, batch in zip(host, sent, strict=True):
        x = feed(batch)["x"]
        assert x.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, want["x"])
    last.data.eval_transforms = ["CenterCrop(4)"]
    last.data.train_transforms = ["CenterCrop(4)"]
    assert batches(last, device_type="cpu", channels_last=True)[1] is None  # transforms need (C, H, W) samples


def test_channels_last_feed_layout(tmp_path: Path) -> None:
    """A model in channels_last gets channels_last inputs; from a channels-last file that is the permuted view as is."""
    for layout in ("channels_first", "channels_last"):
        cfg = config_for(write_h5(tmp_path / f"{layout}.h5", "uint8", layout), layout)
        host, _ = batches(cfg)
        sent, prep = batches(cfg, defer=True)
        for feed_prep, source in ((None, host), (prep, sent)):
            feed = DeviceFeed(CPU, feed_prep, channels_last=True)
            x = feed(dict(source[0]))["x"]
            assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            assert torch.equal(x, host[0]["x"])


class RecordingStreams:
    """Stands in for CudaStreams: records what DeviceFeed asks of the streams, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def compute(self) -> str:
        return "compute"

    @contextlib.contextmanager
    def side(self) -> Iterator[None]:
        self.calls.append("enter side")
        yield
        self.calls.append("leave side")

    def compute_waits_for_side(self) -> None:
        self.calls.append("compute waits")

    def used_by_compute(self, tensor: torch.Tensor) -> None:
        self.calls.append(f"record {tuple(tensor.shape)}")


def test_side_stream_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies and preparation inside the side stream; then the compute stream waits; then every tensor is marked."""
    cfg = config_for(write_h5(tmp_path / "f.h5", "uint8", "channels_last"), "channels_last")
    host, _ = batches(cfg)
    sent, prep = batches(cfg, defer=True)
    streams = RecordingStreams()
    feed = DeviceFeed(CPU, prep, streams=streams)
    original = DevicePrep.__call__

    def recorded(self: DevicePrep, x: torch.Tensor) -> torch.Tensor:
        streams.calls.append("prep")
        return original(self, x)

    monkeypatch.setattr(DevicePrep, "__call__", recorded)
    out = feed(sent[0])
    assert torch.equal(out["x"], host[0]["x"])
    assert streams.calls[:4] == ["enter side", "prep", "leave side", "compute waits"]
    assert sorted(streams.calls[4:]) == sorted(f"record {tuple(v.shape)}" for v in out.values())


# ----------------------------------------------------------------------------- [train] channels_last


def test_channels_last_config_checked() -> None:
    assert config_from_dict({"train": {"channels_last": True}}).train.channels_last
    with pytest.raises(ConfigError, match="train.channels_last"):
        config_from_dict({"train": {"channels_last": "yes"}})
    with pytest.raises(ConfigError, match="train.channels_last = true with train.strategy = 'fsdp'"):
        config_from_dict({"train": {"channels_last": True, "strategy": "fsdp"}})


def trainer_config(tmp_path: Path, channels_last: bool) -> Path:
    data = write_h5(tmp_path / "cnn.h5", "uint8", "channels_last")
    path = tmp_path / f"cnn-{channels_last}.toml"
    path.write_text(
        f'[run]\nname = "cl"\noutput_dir = "{tmp_path / "runs"}"\n'
        f'[data]\npath = "{data}"\nlayout = "channels_last"\nnormalize = "auto"\nbatch_size = 16\nnum_workers = 0\n'
        "val_split = 0.25\ntest_split = 0.0\n"
        '[model]\nname = "cnn"\nin_channels = 3\nhidden = 8\nnum_classes = 3\npadding = 2\n'
        f'[train]\nepochs = 1\nmax_steps_per_epoch = 2\nprogress = "off"\nchannels_last = {str(channels_last).lower()}\n'
        "[log]\ntensorboard = false\n[checkpoint]\nenabled = false\n"
    )
    return path


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_reaches_model_and_inputs(tmp_path: Path, channels_last: bool) -> None:
    info = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=CPU)
    trainer = Trainer(load_config(trainer_config(tmp_path, channels_last)), None, info)
    # A channels-last file: with a channels_last model the loaders leave the permutation (a view) to the feed.
    assert (trainer.train_loader.device_prep is not None) == channels_last
    weights = [p for p in trainer.model.parameters() if p.ndim == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) == channels_last for p in weights)
    for name, loader in (("train", trainer.train_loader), ("val", trainer.eval_loaders["val"])):
        x = trainer.feeds[name](next(iter(loader)))["x"]
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert x.is_contiguous() != channels_last
    trainer.train_one_epoch(0)  # the step runs with that layout
    assert trainer.timer.samples == 32
