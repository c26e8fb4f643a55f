"""The classification defaults reproduce the metric history of the trainer before tasks existed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.run import REPO, assert_ok, dtrain, make_image_h5, only_run_dir, records, write_config

GOLDEN = REPO / "tests" / "golden" / "classification_history.json"
# Timing and memory (also the memory/* keys, newer than the recording) vary between runs; everything else
# must be as recorded.
UNSTABLE = ("time", "samples_per_s", "data_wait_frac", "epoch_time_s", "peak_memory_mb", "rss_anon_mb")


@pytest.mark.parametrize(("nproc", "accum"), [(1, 1), (2, 2)])
def test_classification_defaults_reproduce_the_recorded_history(tmp_path: Path, nproc: int, accum: int) -> None:
    # The recording (tests/golden/classification_history.json) was made with this exact setup by the
    # trainer before [task] existed: 203 events (uneven splits, a short last window with grad_accum 2).
    data = make_image_h5(tmp_path / "d.h5", events=203, shape=(2, 5, 5), classes=3, seed=4)
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        train={"epochs": 2, "log_every": 2, "precision": "fp32", "stop_check_every": 2, "grad_accum": accum},
        model={"name": "mlp", "num_classes": 3, "hidden": [8]},
        data={"batch_size": 12},
    )
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", str(nproc), str(cfg), cwd=tmp_path))
    run_dir = only_run_dir(tmp_path / "runs")
    expected = json.loads(GOLDEN.read_text())[f"nproc{nproc}_accum{accum}"]
    got = [{k: v for k, v in r.items() if k not in UNSTABLE and not k.startswith("memory/")} for r in records(run_dir)]
    # Same records, same keys (new evaluation-only keys such as per-class recall are allowed)...
    assert [(r["kind"], r["epoch"], r["step"]) for r in got] == [(r["kind"], r["epoch"], r["step"]) for r in expected]
    for old, new in zip(expected, got, strict=True):
        assert set(old) <= set(new), set(old) - set(new)
        # ...and the test record's "checkpoint" (which weights it evaluated: best.pt, here the last epoch's).
        extra = {k for k in set(new) - set(old) if "/recall/" not in k and k != "checkpoint"}
        assert not extra, extra
        # ...and the same values: rel 1e-9 allows only last-bit differences of another CPU's kernels.
        for key, value in old.items():
            if isinstance(value, float):
                assert new[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (old["kind"], old["step"], key)
            else:
                assert new[key] == value, (old["kind"], old["step"], key)
