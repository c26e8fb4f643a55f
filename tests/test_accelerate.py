"""`dtrain launch --backend accelerate`: the same worker under `accelerate launch`, 2 real CPU processes.

accelerate's ``--cpu`` flag selects its single-process launcher (``--num_processes`` is then
ignored), so a multi-process CPU plan uses ``--multi_gpu`` (torch.distributed.run underneath, no
GPU needed) and the workers stay on the CPU through ``DTRAIN_DEVICE=cpu``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.run import assert_ok, dtrain, make_image_h5, only_run_dir, records, write_config

pytest.importorskip("accelerate")


@pytest.mark.slow
def test_accelerate_backend_trains_two_cpu_processes(tmp_path: Path) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=200)
    cfg = write_config(tmp_path / "c.toml", data, train={"epochs": 1, "log_every": 1, "precision": "auto"})
    args = ("launch", str(cfg), "--backend", "accelerate", "--gpus", "cpu", "--nproc", "2")

    dry = dtrain(*args, "--dry-run", cwd=tmp_path)
    assert_ok(dry)
    plan = json.loads(dry.stdout)
    assert plan["backend"] == "accelerate"
    assert {"--num_processes=2", "--multi_gpu", "--mixed_precision=no"} <= set(plan["argv"])

    proc = dtrain(*args, cwd=tmp_path, timeout=400)
    assert_ok(proc)
    run_dir = only_run_dir(tmp_path / "runs")
    assert (run_dir / "completed").exists()
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert "world size 2, device cpu" in log, log
    epochs = records(run_dir, "epoch")
    assert len(epochs) == 1 and epochs[0]["val/samples"] == 20, "both ranks' validation shards are counted once"
