"""Reruns (issue 20, point 3): a complete run says how to extend it; a start from scratch says so, and
metrics.jsonl and TensorBoard never hold a step twice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_train.checkpoint import file as ckpt_file
from dist_train.checkpoint.layout import hash_file
from dist_train.config import load_config
from dist_train.distributed.comm import DistInfo
from dist_train.envvars import PREEMPTED_EXIT_CODE
from dist_train.trainer import Trainer
from tests.helpers.run import assert_ok, dtrain, env_for_tests, make_image_h5, records, write_config
from tests.test_logs import _jsonl_metrics, _tensorboard_scalars


def config(tmp_path: Path, **train: object) -> Path:
    data = tmp_path / "d.h5"
    if not data.exists():
        make_image_h5(data, events=100)  # 80 training samples: 5 steps of 16 per epoch on one rank
    return write_config(
        tmp_path / "c.toml",
        data,
        model={"name": "tests.helpers.models:StopSignalMLP", "num_classes": 3, "in_features": 72},
        train={"epochs": 2, "log_every": 1, "precision": "fp32", "stop_check_every": 2, **train},
    )


def launch(tmp_path: Path, cfg: Path, *extra: str, stop_at: str = ""):
    env = env_for_tests({"STOP_SIGNAL_AT": stop_at} if stop_at else None)
    return dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg), *extra, cwd=tmp_path, env=env)


def assert_each_step_once(run_dir: Path, last_step: int) -> None:
    steps = [r["step"] for r in records(run_dir, "step")]
    assert steps == list(range(1, last_step + 1)), steps
    jsonl, tb = _jsonl_metrics(run_dir), _tensorboard_scalars(run_dir / "tb")
    assert set(tb) == set(jsonl)
    for tag, points in jsonl.items():
        assert [s for s, _ in tb[tag]] == [s for s, _ in points], tag


@pytest.mark.slow
def test_rerunning_a_complete_run_says_so_and_how_to_extend_it(tmp_path: Path) -> None:
    cfg = config(tmp_path, epochs=1)
    assert_ok(launch(tmp_path, cfg))
    (first,) = (tmp_path / "runs" / "t").iterdir()
    again = launch(tmp_path, cfg)
    assert_ok(again)
    second = next(p for p in (tmp_path / "runs" / "t").iterdir() if p != first)
    assert (
        f"the newest run of 't', {first}, is complete; starting a new run from scratch in {second} "
        f"(to train the complete run further instead: dtrain launch {cfg} --run-dir {first} "
        "--set train.epochs=N (more than its 1))"
    ) in again.stderr
    # The advice works: the complete run goes on from its final checkpoint.
    extended = launch(tmp_path, cfg, "--run-dir", str(first), "--set", "train.epochs=2")
    assert_ok(extended)
    assert "resuming run in" in extended.stderr
    assert [r["epoch"] for r in records(first, "epoch")] == [1, 2]
    assert_each_step_once(first, 10)


def test_a_damaged_only_checkpoint_restarts_from_scratch_says_so_and_rewinds_the_records(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    run_dir = tmp_path / "r"
    cut = launch(tmp_path, cfg, "--run-dir", str(run_dir), stop_at="7")
    assert cut.returncode == PREEMPTED_EXIT_CODE, cut.stdout + cut.stderr
    checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*"))
    assert checkpoints
    for path in checkpoints:  # every checkpoint torn, as by a full disk
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rerun = launch(tmp_path, cfg, "--run-dir", str(run_dir))
    assert_ok(rerun)
    said = "no valid checkpoint in"
    assert said in rerun.stdout + rerun.stderr
    assert said in (run_dir / "logs" / "rank0.log").read_text()
    assert_each_step_once(run_dir, 10)
    assert [r["epoch"] for r in records(run_dir, "epoch")] == [1, 2]


def test_an_explicit_resume_of_a_damaged_checkpoint_stops_every_rank_with_the_same_paragraph(tmp_path: Path) -> None:
    # Rank 0 verifies; the others must hear its verdict rather than read the damaged file themselves.
    cfg = config(tmp_path, epochs=1)
    first = tmp_path / "first"
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), "--run-dir", str(first), cwd=tmp_path))
    checkpoint = sorted((first / "checkpoints").glob("ckpt-*.pt"))[-1]
    before = checkpoint.read_bytes()
    damaged = bytearray(before)
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte inside the tensors: torch.load alone would not notice
    checkpoint.write_bytes(bytes(damaged))
    again = tmp_path / "again"
    args = ("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), "--run-dir", str(again), "--resume", str(checkpoint))
    proc = dtrain(*args, cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert f"checkpoint {checkpoint} failed verification: sha256 mismatch" in text and "Traceback" not in text
    for rank in (0, 1):
        assert "failed verification" in (again / "logs" / f"rank{rank}.log").read_text(), rank
    assert checkpoint.read_bytes() == bytes(damaged)  # nothing written over the user's file
    assert not any((again / "checkpoints").glob("ckpt-*"))  # no training step ran from it


def test_a_resume_reads_the_checkpoint_for_its_sha256_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rank 0 verifies while choosing the checkpoint; hashing it again before loading read every byte twice.
    cfg = config(tmp_path, epochs=1)
    run_dir = tmp_path / "r"
    assert_ok(launch(tmp_path, cfg, "--run-dir", str(run_dir)))
    hashed: list[str] = []

    def counting_hash(path: Path) -> tuple[int, str]:
        hashed.append(Path(path).name)
        return hash_file(path)

    monkeypatch.setattr(ckpt_file, "hash_file", counting_hash)
    info = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    trainer = Trainer(load_config(cfg), run_dir, info)
    assert trainer.maybe_resume() == 5
    newest = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert hashed == [newest.name]


# ----------------------------------------------------------------------------------- the logger alone


def _history(run_dir: Path, resume_step: int | None, resume_epoch: int | None, redo: list[dict]) -> None:
    from dist_train.logs import RunMetricsLogger

    first = RunMetricsLogger(run_dir, jsonl=True, tensorboard=True, resume_step=None)
    for step in range(1, 7):
        first.log({"kind": "step", "epoch": (step - 1) // 3, "step": step, "train/loss_running": 1.0 / step})
        if step % 3 == 0:
            first.log({"kind": "epoch", "epoch": (step - 1) // 3, "step": step, "train/loss": 0.5 / step})
    first.close()
    again = RunMetricsLogger(run_dir, jsonl=True, tensorboard=True, resume_step=resume_step, resume_epoch=resume_epoch)
    for record in redo:
        again.log(record)
    again.close()


def test_a_resume_at_an_epochs_last_step_keeps_that_steps_records_in_tensorboard(tmp_path: Path) -> None:
    # A checkpoint at step 6 before epoch 1's summary: the summary is written again, step 6's own
    # record is kept (and TensorBoard, which purges from step 6, gets it again from metrics.jsonl).
    _history(tmp_path, 6, 1, [{"kind": "epoch", "epoch": 1, "step": 6, "train/loss": 0.25}])
    assert_each_step_once(tmp_path, 6)
    tb = _tensorboard_scalars(tmp_path / "tb")
    step, value = tb["train/loss_running"][-1]
    assert step == 6 and abs(value - 1 / 6) < 1e-7
    assert [s for s, _ in tb["train/loss"]] == [3, 6] and tb["train/loss"][-1][1] == 0.25


def test_a_start_from_scratch_in_a_used_run_directory_discards_the_earlier_records(tmp_path: Path) -> None:
    _history(tmp_path, None, None, [{"kind": "step", "epoch": 0, "step": 1, "train/loss_running": 9.0}])
    assert [(r["step"], r["train/loss_running"]) for r in records(tmp_path)] == [(1, 9.0)]
    assert _tensorboard_scalars(tmp_path / "tb") == {"train/loss_running": [(1, 9.0)]}
