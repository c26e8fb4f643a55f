"""Helpers shared by benchmarks/overhead.py and benchmarks/compare.py.

Workload definitions (model + data layout), synthetic HDF5 files cached under ``.bench_tmp/``, the
two datasets peers' users write (lazily opened h5py per worker, or everything in memory), the
course's AverageMeter, dtrain config files, medians, machine facts and the ``RESULT`` line.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BENCH_DIR = REPO / ".bench_tmp"
MPMT_SHAPE = (38, 16, 40)  # channels (19 charges + 19 times), module rows, module columns


@dataclass(frozen=True)
class Workload:
    """One model on one data layout, as a dtrain [model] section and a synthetic file.

    ``targets`` empty: classification of ``labels``; else regression (MSE) of those datasets of the
    wch5 layout, flattened per sample and concatenated (the model's output width is their total).

    ``layout = "hits"``: a hit-list file (synth_hits's demo detector on the ``shape[1:]`` pixel grid)
    that dtrain reads with ``data.format = "hits"``, building 19 charge + 19 time channels per module
    pixel, so ``shape`` is (38, H, W). Other readers have no hit-list reader: they get the same events
    already converted to images (:func:`peer_data`, ``dtrain data convert``).
    """

    name: str
    model: dict[str, Any]
    layout: str  # synth_dataset layout: "image", "wch5" or "hits"
    shape: tuple[int, int, int]
    num_classes: int  # classes in the synthetic file (the model's width is in ``model``)
    targets: tuple[str, ...] = ()

    def data_file(self, events: int) -> Path:
        shape = "x".join(str(s) for s in self.shape)
        return BENCH_DIR / "data" / f"{self.layout}-{shape}-{events}.h5"

    @property
    def hits(self) -> bool:
        return self.layout == "hits"


WORKLOADS: dict[str, Workload] = {
    "mlp": Workload("mlp", {"name": "mlp", "hidden": [128], "num_classes": 10}, "image", (1, 28, 28), 10),
    "cnn": Workload("cnn", {"name": "cnn", "num_classes": 10}, "image", (1, 28, 28), 10),
    "simple_mlp": Workload("simple_mlp", {"name": "simple_mlp", "num_classes": 3}, "wch5", (16, 40, 38), 3),
    "resnet18": Workload(
        "resnet18", {"name": "resnet18", "num_classes": 10, "small_input": True}, "image", (3, 32, 32), 10
    ),
    # Regression on the demo water-Cherenkov layout: the tutorial's SimpleMLP predicting the energy...
    "regression": Workload(
        "regression", {"name": "simple_mlp", "num_classes": 1}, "wch5", (16, 40, 38), 3, targets=("energies",)
    ),
    # ...and a step as small as mlp's (784 inputs, 128 hidden, batch 32) predicting energy, vertex and
    # direction at once: the workload where a task's per-step cost would show.
    "multitarget": Workload(
        "multitarget",
        {"name": "mlp", "hidden": [128], "num_classes": 6},
        "wch5",
        (4, 14, 14),
        3,
        targets=("energies", "positions", "angles"),
    ),
    # Issue 24's goal workloads: water-Cherenkov mPMT images, 38 channels (19 PMT charges + 19 times) on
    # the 16 x 40 module grid, 3 classes. ResNet-18 with its small-input stem (3x3 stride 1, no max-pool)
    # on an image file (the wch5 demo layout, channels first)...
    "resnet18_mpmt": Workload(
        "resnet18_mpmt", {"name": "resnet18", "num_classes": 3, "small_input": True}, "wch5", MPMT_SHAPE, 3
    ),
    # ...on a hit-list file (configs/hits_resnet.toml's data: dtrain builds the images while reading;
    # the other contenders read the same events converted to images, see Workload)...
    "resnet18_hits": Workload(
        "resnet18_hits", {"name": "resnet18", "num_classes": 3, "small_input": True}, "hits", MPMT_SHAPE, 3
    ),
    # ...and the tutorial's SimpleCNN (configs/tutorial_cnn.toml's model) on resnet18_mpmt's file. The
    # tutorial's file is channels last; here every contender reads the channels-first file, so no one
    # pays a per-batch permute the others skip.
    "tutorial_cnn": Workload(
        "tutorial_cnn",
        {"name": "cnn", "num_classes": 3, "in_channels": 38, "padding": 2, "hidden": 64},
        "wch5",
        MPMT_SHAPE,
        3,
    ),
}
GOAL_WORKLOADS = ("resnet18_mpmt", "resnet18_hits", "tutorial_cnn")  # issue 24: compiled, busy GPU


def peer_data(workload: Workload, events: int) -> Path:
    """The file the non-dtrain contenders read: the workload's file, or for a hit-list workload the same
    events as (N, 38, H, W) images (written once beside it by ``convert_hits``, then reused)."""
    from dist_train.data.hits import HitSpec
    from dist_train.data.writers.convert_hits import convert_hits

    path = ensure_data(workload, events)
    if not workload.hits:
        return path
    images = path.with_name(f"{path.stem}-images.h5")
    if not images.exists():
        convert_hits(path, images, HitSpec(**hit_data_keys(path)), progress=False)
    return images


def hit_data_keys(path: Path) -> dict[str, Any]:
    """The [data] keys of a hit-list workload's file (configs/hits_resnet.toml's, with the demo geometry)."""
    from dist_train.data.writers.synth_hits import geometry_path_for

    return {"geometry_file": str(geometry_path_for(path)), "representation": "mpmt_image"}


def ensure_data(workload: Workload, events: int) -> Path:
    """The workload's synthetic HDF5 file with ``events`` samples (written once, then reused)."""
    from dist_train.data.writers.synth import synth_dataset

    path = workload.data_file(events)
    # A wch5 file cached by an older dtrain has no regression targets: write it again. A hit-list file
    # comes with its geometry (synth_hits publishes the geometry first, then the data file).
    if not path.exists() or (workload.targets and not _has_datasets(path, workload.targets)):
        synth_dataset(
            path,
            layout=workload.layout,
            events=events,
            seed=0,
            shape=workload.shape,
            num_classes=workload.num_classes,
            progress=False,
        )
    return path


def _has_datasets(path: Path, keys: tuple[str, ...]) -> bool:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError:  # already open in this process with locking=False (dtrain's reader); see LazyH5Dataset
        f = h5py.File(path, "r", locking=False)
    with f:
        return all(key in f for key in keys)


def build_workload_model(workload: Workload) -> Any:
    """The exact nn.Module dtrain builds for this workload, so every contender trains the same network."""
    from dist_train.config import ModelConfig
    from dist_train.models import build_model

    fields = dict(workload.model)
    name = fields.pop("name")
    num_classes = fields.pop("num_classes")
    cfg = ModelConfig(name=name, num_classes=num_classes)
    for key, value in fields.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
        else:
            cfg.kwargs[key] = value
    return build_model(cfg, workload.shape)


class LazyH5Dataset:
    """The map-style h5py Dataset from the PyTorch forums / peers' docs: one sample per ``__getitem__``,
    the file opened lazily in each process (h5py handles must not cross a fork)."""

    def __init__(
        self, path: Path, x_key: str = "event_data", y_key: str = "labels", targets: tuple[str, ...] = ()
    ) -> None:
        import h5py

        self.path, self.x_key, self.y_key, self.targets = str(path), x_key, y_key, targets
        try:
            f = h5py.File(self.path, "r")
        except OSError:  # see __getitem__
            f = h5py.File(self.path, "r", locking=False)
        with f:
            self.length = int(f[y_key].shape[0])
        self._file: Any = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        import h5py
        import torch

        if self._file is None:
            try:
                self._file = h5py.File(self.path, "r")
            except OSError:
                # Only in overhead.py, where dtrain's reader (locking=False) opened the file in this
                # process first: HDF5 insists on equal locking flags within a process.
                self._file = h5py.File(self.path, "r", locking=False)
        x = torch.from_numpy(np.asarray(self._file[self.x_key][index], dtype=np.float32))
        if self.targets:  # regression: the targets' values of this sample, flattened and concatenated
            values = [np.asarray(self._file[key][index], dtype=np.float32).reshape(-1) for key in self.targets]
            return x, torch.from_numpy(np.concatenate(values))
        y = int(self._file[self.y_key][index])
        return x, y


def in_memory_dataset(
    path: Path, x_key: str = "event_data", y_key: str = "labels", targets: tuple[str, ...] = ()
) -> Any:
    """The whole file as a TensorDataset (what users do when the data fits in RAM).

    ``targets``: y is those float datasets, flattened per sample and concatenated (N, width),
    as a regression user would prepare them; else y is the int64 labels.
    """
    import h5py
    import torch
    from torch.utils.data import TensorDataset

    with h5py.File(path, "r") as f:
        x = torch.from_numpy(np.asarray(f[x_key][...], dtype=np.float32))
        if targets:
            columns = [np.asarray(f[key][...], dtype=np.float32).reshape(len(x), -1) for key in targets]
            y = torch.from_numpy(np.concatenate(columns, axis=1))
        else:
            y = torch.from_numpy(np.asarray(f[y_key][...]).astype(np.int64).reshape(-1))
    return TensorDataset(x, y)


class AverageMeter:
    """The course's AverageMeter: running sum and count of a per-batch value."""

    def __init__(self) -> None:
        self.sum = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.sum += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(1, self.count)


def dtrain_config(
    path: Path,
    workload: Workload,
    data_path: Path,
    *,
    batch_size: int,
    steps_per_epoch: int,
    epochs: int,
    num_workers: int,
    output_dir: Path,
    log_every: int = 50,
    precision: str = "fp32",
    checkpoint: bool = False,
    extra: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """A dtrain config for benchmarking: no val/test split, no normalisation, no TensorBoard.

    ``extra``: more keys per section (``{"train": {"strategy": "fsdp"}, "fsdp": {...}}``), merged in."""
    from dist_train.config import dumps_toml

    sections: dict[str, dict[str, Any]] = {
        "run": {"name": f"bench-{workload.name}", "output_dir": str(output_dir), "seed": 0},
        "data": {
            "path": str(data_path),
            "val_split": 0.0,
            "test_split": 0.0,
            "batch_size": batch_size,
            "num_workers": num_workers,
            "normalize": "none",
        },
        "model": dict(workload.model),
        "optim": {"name": "adam", "lr": 1e-3},
        "train": {
            "epochs": epochs,
            "precision": precision,
            "max_steps_per_epoch": steps_per_epoch,
            "log_every": log_every,
            "progress": "off",
        },
        "log": {"tensorboard": False, "jsonl": True},
        "checkpoint": {"enabled": checkpoint},
    }
    if workload.targets:
        sections["task"] = {"name": "regression", "targets": list(workload.targets), "loss": "mse"}
    if workload.hits:
        sections["data"].update(format="hits", **hit_data_keys(data_path))
    for name, values in (extra or {}).items():
        sections.setdefault(name, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_toml(sections))
    return path


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def peak_rss_mb() -> float:
    """Peak resident set of this process (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def machine_summary() -> str:
    import torch

    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for module in ("accelerate", "lightning", "h5py", "numpy"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.node()}: {cores} CPU cores, load average {load_average()}; " + ", ".join(versions)


def result_line(name: str, value: float, op: str, target: float, *, fmt: str = ".3f") -> str:
    """``RESULT <name> value=<x> target=<op><y> met|missed`` (the line every benchmark ends with)."""
    met = value >= target if op == ">=" else value <= target
    return f"RESULT {name} value={value:{fmt}} target={op}{target:g} {'met' if met else 'missed'}"
