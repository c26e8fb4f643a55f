"""Metrics logs on resume: the records a resumed run writes again are dropped first, others kept."""

from __future__ import annotations

import json
from pathlib import Path

from dist_train.logs import RunMetricsLogger


def write_records(run_dir: Path, records: list[dict]) -> None:
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "st')


def kept(run_dir: Path) -> list[tuple]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["kind"], r["epoch"], r["step"]) for r in map(json.loads, lines)]


# Epochs count from 1, as on the console: a step record carries the epoch in progress, an epoch
# record the epoch just finished, the test record the last epoch.
HISTORY = [
    {"kind": "step", "epoch": 1, "step": 3},
    {"kind": "step", "epoch": 1, "step": 6},
    {"kind": "epoch", "epoch": 1, "step": 6},
    {"kind": "step", "epoch": 2, "step": 9},
    {"kind": "step", "epoch": 2, "step": 12},
    {"kind": "epoch", "epoch": 2, "step": 12},
    {"kind": "test", "epoch": 2, "step": 12},
]


def test_resume_mid_epoch_drops_later_records_and_the_torn_line(tmp_path: Path) -> None:
    write_records(tmp_path, HISTORY)
    RunMetricsLogger(tmp_path, jsonl=True, tensorboard=False, resume_step=9, resume_epoch=2).close()
    assert kept(tmp_path) == [("step", 1, 3), ("step", 1, 6), ("epoch", 1, 6), ("step", 2, 9)]


def test_checkpoint_at_an_epochs_last_step_before_its_summary_drops_that_summary(tmp_path: Path) -> None:
    # A step checkpoint at step 6 (epoch 1 not yet complete in it): the epoch-1 summary is redone.
    write_records(tmp_path, HISTORY)
    RunMetricsLogger(tmp_path, jsonl=True, tensorboard=False, resume_step=6, resume_epoch=1).close()
    assert kept(tmp_path) == [("step", 1, 3), ("step", 1, 6)]


def test_completed_epoch_checkpoint_keeps_its_summary_and_drops_the_test_record(tmp_path: Path) -> None:
    write_records(tmp_path, HISTORY)
    RunMetricsLogger(tmp_path, jsonl=True, tensorboard=False, resume_step=12, resume_epoch=3).close()
    assert kept(tmp_path) == [(r["kind"], r["epoch"], r["step"]) for r in HISTORY[:-1]]


# ----------------------------------------------------------------------------------- TensorBoard = metrics.jsonl


def _tensorboard_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _jsonl_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from dist_train.logs import is_metric
    from tests.helpers.run import records

    out: dict[str, list[tuple[int, float]]] = {}
    for record in records(run_dir):
        for key, value in record.items():
            if is_metric(key, value):
                out.setdefault(key, []).append((record["step"], float(value)))
    return out


def test_tensorboard_has_every_metric_of_metrics_jsonl_under_the_same_name(tmp_path: Path) -> None:
    """A real 2-rank training: the TensorBoard files read back hold the same tags, steps and values."""
    import math

    from tests.helpers.run import assert_ok, dtrain, make_image_h5, only_run_dir, write_config

    data = make_image_h5(tmp_path / "d.h5", events=200)
    cfg = write_config(tmp_path / "c.toml", data, train={"epochs": 2, "log_every": 2, "precision": "fp32"})
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), cwd=tmp_path))
    run_dir = only_run_dir(tmp_path / "runs")
    jsonl, tb = _jsonl_metrics(run_dir), _tensorboard_scalars(run_dir / "tb")
    # What the issue found missing, and what was there before.
    for key in (
        "lr",
        "samples_per_s",
        "data_wait_frac",
        "epoch_time_s",
        "peak_memory_mb",
        "train/loss",
        "val/accuracy",
        "test/loss",
        "train/loss_running",
    ):
        assert key in jsonl, sorted(jsonl)
    assert set(tb) == set(jsonl), f"only in jsonl: {set(jsonl) - set(tb)}; only in TensorBoard: {set(tb) - set(jsonl)}"
    for tag, points in jsonl.items():
        assert [s for s, _ in tb[tag]] == [s for s, _ in points], tag
        for (_, written), (_, read) in zip(points, tb[tag], strict=True):
            assert math.isclose(read, written, rel_tol=1e-6, abs_tol=1e-6), (tag, written, read)  # float32 in TB
