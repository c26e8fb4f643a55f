"""End-to-end training through `dtrain launch` with real torchrun/gloo processes on the CPU."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dist_train.config import load_config
from launcher.cmd_launch import PHASES_LABEL
from tests.helpers.run import (
    REPO,
    assert_ok,
    dtrain,
    load_final_model,
    make_image_h5,
    only_run_dir,
    records,
    write_config,
)


def read_tensorboard_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_quickstart_two_processes_writes_every_output(tmp_path: Path) -> None:
    shutil.copy(REPO / "configs" / "quickstart.toml", tmp_path / "quickstart.toml")
    proc = dtrain(
        "launch",
        "--gpus",
        "cpu",
        "--nproc",
        "2",
        "quickstart.toml",
        "--set",
        "data.synth_events=800",
        "--set",
        "train.epochs=2",
        "--set",
        "data.num_workers=1",
        cwd=tmp_path,
        timeout=600,
    )
    assert_ok(proc)
    assert (tmp_path / "data" / "demo_wch5.h5").is_file(), "launch should create the demo data when missing"
    run_dir = only_run_dir(tmp_path / "runs")
    for name in (
        "config.toml",
        "metrics.jsonl",
        "completed",
        "logs/rank0.log",
        "logs/rank1.log",
        "checkpoints/latest",
        "checkpoints/best.pt",
    ):
        assert (run_dir / name).exists(), name

    saved = load_config(run_dir / "config.toml")
    assert saved.train.epochs == 2 and saved.data.synth_events == 800
    assert Path(saved.data.path).is_absolute()

    epochs = records(run_dir, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        for key in (
            "train/loss",
            "train/accuracy",
            "val/loss",
            "val/accuracy",
            "lr",
            "samples_per_s",
            "data_wait_frac",
        ):
            assert key in r, key
    assert epochs[-1]["val/accuracy"] > 0.5, "the demo data should be learnable (3 classes, chance = 0.33)"
    test = records(run_dir, "test")
    assert len(test) == 1 and "test/accuracy" in test[0]

    scalars = read_tensorboard_scalars(run_dir / "tb")
    for r in epochs:
        for key in ("train/loss", "val/loss", "val/accuracy"):
            steps = dict(scalars[key])
            assert steps[r["step"]] == pytest.approx(r[key], rel=1e-6), key
    assert dict(scalars["test/accuracy"])[test[0]["step"]] == pytest.approx(test[0]["test/accuracy"], rel=1e-6)


def _naive_metrics(h5_path: Path, rows: np.ndarray, model: torch.nn.Module) -> tuple[float, float]:
    """The plain loop, one sample at a time, as a student would write it."""
    loss_sum, correct = 0.0, 0
    with h5py.File(h5_path, "r") as f, torch.no_grad():
        for row in rows:
            x = torch.from_numpy(np.asarray(f["event_data"][row], dtype=np.float32))[None]
            y = torch.tensor([int(f["labels"][row])])
            logits = model(x)
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int(logits.argmax(1).item() == y.item())
    return loss_sum / len(rows), correct / len(rows)


def test_two_rank_validation_equals_one_process_evaluation(tmp_path: Path) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=610)  # val split of 61 samples: not divisible by 2
    cfg = write_config(tmp_path / "c.toml", data, train={"epochs": 2, "log_every": 5, "precision": "fp32"})
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), cwd=tmp_path))
    run_dir = only_run_dir(tmp_path / "runs")
    last = records(run_dir, "epoch")[-1]
    assert last["val/samples"] == 61

    out = dtrain(
        "eval", str(run_dir), "--split", "val", "--json", "--predictions", str(tmp_path / "p.npz"), cwd=tmp_path
    )
    assert_ok(out)
    single = json.loads(out.stdout)
    assert single["val/samples"] == 61
    assert single["val/loss"] == pytest.approx(last["val/loss"], abs=1e-6)
    assert single["val/accuracy"] == pytest.approx(last["val/accuracy"], abs=1e-6)

    preds = np.load(tmp_path / "p.npz")
    assert len(np.unique(preds["indices"])) == 61, "every validation event exactly once"
    from dist_train.models import build_model

    state = load_final_model(run_dir)
    model = build_model(load_config(run_dir / "config.toml").model, (2, 6, 6))
    model.load_state_dict(state["model"])
    model.eval()
    loss, acc = _naive_metrics(data, np.sort(preds["indices"]), model)
    assert loss == pytest.approx(last["val/loss"], abs=1e-6)
    assert acc == pytest.approx(last["val/accuracy"], abs=1e-6)

    test_dist = records(run_dir, "test")[0]  # the end-of-run test evaluates best.pt
    out = dtrain("eval", str(run_dir), "--split", "test", "--checkpoint", "best", "--json", cwd=tmp_path)
    assert_ok(out)
    assert json.loads(out.stdout)["test/loss"] == pytest.approx(test_dist["test/loss"], abs=1e-6)


def test_two_ranks_match_one_rank_with_double_batch(tmp_path: Path) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=400)
    common = {
        "optim": {"name": "sgd", "lr": 0.2, "momentum": 0.9},
        "checkpoint": {"every_epochs": 1},
    }
    one = write_config(
        tmp_path / "one.toml",
        data,
        **common,
        run={"name": "one", "output_dir": str(tmp_path / "runs"), "seed": 3},
        data={"batch_size": 16},
        train={"epochs": 1, "max_steps_per_epoch": 6, "precision": "fp32"},
    )
    two = write_config(
        tmp_path / "two.toml",
        data,
        **common,
        run={"name": "two", "output_dir": str(tmp_path / "runs"), "seed": 3},
        data={"batch_size": 8},
        train={"epochs": 1, "max_steps_per_epoch": 6, "precision": "fp32"},
    )
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(one), cwd=tmp_path))
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(two), cwd=tmp_path))
    w1 = load_final_model(next((tmp_path / "runs" / "one").iterdir()))["model"]
    w2 = load_final_model(next((tmp_path / "runs" / "two").iterdir()))["model"]
    assert load_final_model(next((tmp_path / "runs" / "two").iterdir()))["step"] == 6
    changed = False
    for name, t1 in w1.items():
        torch.testing.assert_close(w2[name], t1, atol=1e-5, rtol=0)
        changed = changed or name.endswith("weight")
    assert changed


def test_debug_mode_runs_one_cpu_process_with_few_batches(tmp_path: Path) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=600)
    cfg = write_config(tmp_path / "c.toml", data, data={"num_workers": 2}, train={"epochs": 2, "precision": "fp32"})
    proc = dtrain("--verbose", "launch", "--debug", str(cfg), cwd=tmp_path)
    assert_ok(proc)
    # --verbose says where the launcher's own start-up time went, phase by phase.
    assert f"{PHASES_LABEL} config" in proc.stdout + proc.stderr
    assert "devices (NVML query, reservation)" in proc.stdout + proc.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    assert [r["step"] for r in records(run_dir, "epoch")] == [5, 10]
    assert all(abs(r["time"] - time.time()) < 600 for r in records(run_dir)), "records carry a wall-clock time"
    epoch = records(run_dir, "epoch")[0]
    assert 0 < epoch["rss_anon_mb"] <= epoch["peak_memory_mb"], "own memory, without mapped file pages"
    assert not (run_dir / "logs" / "rank1.log").exists()
    assert "world size 1" in (run_dir / "logs" / "rank0.log").read_text()


def test_bf16_histograms_and_time_based_checkpoints(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_train.checkpoint.catalog import list_checkpoints

    data = make_image_h5(tmp_path / "d.h5", events=300)
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        train={"epochs": 1, "precision": "bf16", "max_steps_per_epoch": 6, "stop_check_every": 1},
        log={"histograms": True},
        checkpoint={"every_minutes": 0.0001, "keep_last": 10},
    )
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg), cwd=tmp_path))
    run_dir = only_run_dir(tmp_path / "runs")
    assert "precision bf16" in (run_dir / "logs" / "rank0.log").read_text()
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    assert any(tag.startswith("weights/") for tag in acc.Tags()["histograms"])
    reasons = [load_checkpoint_reason(p) for p in list_checkpoints(run_dir / "checkpoints")]
    assert "time" in reasons and "epoch" in reasons


def load_checkpoint_reason(record) -> str:
    from dist_train.checkpoint.file import load_checkpoint

    return load_checkpoint(record.path)["reason"]
