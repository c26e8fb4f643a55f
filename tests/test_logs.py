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


HISTORY = [
    {"kind": "step", "epoch": 0, "step": 3},
    {"kind": "step", "epoch": 0, "step": 6},
    {"kind": "epoch", "epoch": 0, "step": 6},
    {"kind": "step", "epoch": 1, "step": 9},
    {"kind": "step", "epoch": 1, "step": 12},
    {"kind": "epoch", "epoch": 1, "step": 12},
    {"kind": "test", "epoch": 1, "step": 12},
]


def test_resume_mid_epoch_drops_later_records_and_the_torn_line(tmp_path: Path) -> None:
    write_records(tmp_path, HISTORY)
    RunMetricsLogger(tmp_path, jsonl=True, tensorboard=False, resume_step=9, resume_epoch=1).close()
    assert kept(tmp_path) == [("step", 0, 3), ("step", 0, 6), ("epoch", 0, 6), ("step", 1, 9)]


def test_checkpoint_at_an_epochs_last_step_before_its_summary_drops_that_summary(tmp_path: Path) -> None:
    # A step checkpoint at step 6 (epoch 0 not yet complete in it): the epoch-0 summary is redone.
    write_records(tmp_path, HISTORY)
    RunMetricsLogger(tmp_path, jsonl=True, tensorboard=False, resume_step=6, resume_epoch=0).close()
    assert kept(tmp_path) == [("step", 0, 3), ("step", 0, 6)]


def test_completed_epoch_checkpoint_keeps_its_summary_and_drops_the_test_record(tmp_path: Path) -> None:
    write_records(tmp_path, HISTORY)
    RunMetricsLogger(tmp_path, jsonl=True, tensorboard=False, resume_step=12, resume_epoch=2).close()
    assert kept(tmp_path) == [(r["kind"], r["epoch"], r["step"]) for r in HISTORY[:-1]]
