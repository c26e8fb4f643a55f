"""Write small configs and data, run `dtrain` as a user would (a real subprocess), read the outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dist_train.config import dumps_toml

REPO = Path(__file__).resolve().parents[2]
DTRAIN = [sys.executable, "-m", "launcher.cli"]


def make_image_h5(
    path: Path, *, events: int = 600, shape: tuple[int, ...] = (2, 6, 6), classes: int = 3, seed: int = 0
) -> Path:
    from dist_train.data.writers.synth import synth_dataset

    return synth_dataset(path, layout="image", events=events, seed=seed, shape=shape, num_classes=classes)


def write_config(path: Path, data_path: Path, **sections: dict[str, Any]) -> Path:
    """A small, fast config; ``sections`` override or extend each section."""
    base: dict[str, dict[str, Any]] = {
        "run": {"name": "t", "output_dir": str(path.parent / "runs"), "seed": 0},
        "data": {
            "path": str(data_path),
            "x_key": "event_data",
            "y_key": "labels",
            "val_split": 0.1,
            "test_split": 0.1,
            "batch_size": 16,
            "num_workers": 0,
        },
        "model": {"name": "mlp", "num_classes": 3, "hidden": [16]},
        "optim": {"name": "adam", "lr": 0.01},
        # Stop requests agreed every 2 steps (default 10): short test runs still stop promptly.
        "train": {"epochs": 2, "log_every": 1, "precision": "fp32", "stop_check_every": 2},
        "checkpoint": {"keep_last": 3},
    }
    for name, values in sections.items():
        if name == "model" and "name" in values:
            base["model"] = dict(values)  # another model: the default's kwargs do not apply
        else:
            base.setdefault(name, {}).update(values)
    path.write_text(dumps_toml(base))
    return path


def env_for_tests(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Workers import test-only models (tests.helpers.models) by module path.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def dtrain(
    *args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DTRAIN, *args], cwd=cwd, env=env or env_for_tests(), capture_output=True, text=True, timeout=timeout
    )


def start_dtrain(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*DTRAIN, *args],
        cwd=cwd,
        env=env or env_for_tests(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def records(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    out = [json.loads(line) for line in lines if line.strip()]
    return [r for r in out if kind is None or r.get("kind") == kind]


def only_run_dir(runs: Path) -> Path:
    dirs = [p for p in runs.glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def load_final_model(run_dir: Path) -> dict[str, Any]:
    """The newest valid checkpoint as one dict; a sharded one consolidated (model and optimizer) in this process."""
    from dist_train.checkpoint.catalog import latest_valid_checkpoint
    from dist_train.checkpoint.file import load_checkpoint
    from dist_train.checkpoint.sharded import consolidate

    latest = latest_valid_checkpoint(run_dir / "checkpoints")
    assert latest is not None, f"no checkpoint in {run_dir}"
    return consolidate(latest, optimizer=True) if latest.is_dir() else load_checkpoint(latest)


def assert_ok(proc: subprocess.CompletedProcess[str], code: int = 0) -> None:
    assert proc.returncode == code, f"exit {proc.returncode} != {code}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"


def metric_history(
    run_dir: Path, keys: tuple[str, ...] = ("train/loss", "train/accuracy", "val/loss", "val/accuracy")
) -> list[tuple[Any, ...]]:
    return [(r["epoch"], r["step"], *(r[k] for k in keys)) for r in records(run_dir, "epoch")]


def float_array(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)
