"""`dtrain eval RUN --predictions FILE` as a user runs it, for every kind of task: the printed metrics
are the task's own (the same numbers as `--json`), the file holds the task's columns, exit 0."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dist_train.data.writers.synth import synth_dataset
from tests.helpers.run import assert_ok, dtrain, make_image_h5, only_run_dir, write_config

WCH5_SHAPE = (2, 6, 6)

TASKS: dict[str, tuple[dict[str, Any], set[str]]] = {
    "classification": ({"name": "classification"}, {"labels", "softmax", "predictions"}),
    "regression": (
        {"name": "regression", "targets": ["energies", "positions"], "target_norm": "auto", "loss": "mse"},
        {"energies_pred", "energies_true", "positions_pred", "positions_true"},
    ),
    # AbsErrorTask has no predictions(): its raw outputs are written.
    "custom": (
        {"name": "tests.helpers.tasks:AbsErrorTask", "targets": ["energies"], "target_norm": "none", "loss": ""},
        {"outputs"},
    ),
}


def trained_run(tmp_path: Path, task: dict[str, Any]) -> Path:
    if task["name"] == "classification":
        data = make_image_h5(tmp_path / "d.h5", events=120)
        model: dict[str, Any] = {"name": "mlp", "num_classes": 3, "hidden": [8]}
    else:
        data = synth_dataset(tmp_path / "d.h5", layout="wch5", events=120, seed=2, shape=WCH5_SHAPE, progress=False)
        model = {"name": "mlp", "hidden": [8]}
    cfg = write_config(tmp_path / "c.toml", data, model=model, task=task, train={"epochs": 1, "test_at_end": False})
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg), cwd=tmp_path))
    return only_run_dir(tmp_path / "runs")


def printed_metrics(stdout: str) -> dict[str, float]:
    """The `  test/key  value` lines of eval's plain output."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^\s+(test/\S+)\s+(\S+)$", stdout, re.MULTILINE)}


@pytest.mark.parametrize("kind", list(TASKS))
def test_eval_with_predictions_prints_the_tasks_metrics_and_writes_its_columns(tmp_path: Path, kind: str) -> None:
    task, columns = TASKS[kind]
    run_dir = trained_run(tmp_path, task)
    preds = tmp_path / "p.npz"

    out = dtrain("eval", str(run_dir), "--split", "test", "--predictions", str(preds), cwd=tmp_path)
    assert_ok(out)
    assert "Traceback" not in out.stdout + out.stderr
    assert f"predictions -> {preds}" in out.stdout
    with np.load(preds) as arrays:
        assert set(arrays.files) == {"indices", *columns}
        assert len(arrays["indices"]) == 12  # 10% of 120 events

    as_json = dtrain("eval", str(run_dir), "--split", "test", "--json", cwd=tmp_path)
    assert_ok(as_json)
    expected = {k: v for k, v in json.loads(as_json.stdout).items() if k.startswith("test/")}
    printed = printed_metrics(out.stdout)
    assert set(printed) == set(expected), out.stdout
    for key, value in expected.items():
        assert printed[key] == pytest.approx(value, rel=1e-5, abs=1e-12), key
    if kind == "custom":
        assert {"test/mae", "test/hit_rate", "test/loss"} <= set(printed)


def test_eval_help_promises_columns_per_task() -> None:
    out = dtrain("eval", "--help", cwd=Path.cwd())
    assert_ok(out)
    text = " ".join(out.stdout.split())
    assert "classification: labels, softmax, predictions" in text
    assert "regression: <target>_pred and <target>_true" in text
    assert "Write indices, labels, softmax" not in text
