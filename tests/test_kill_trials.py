"""Kill trials: SIGKILL a 3-rank training (every process of it) at random moments, many times.

After every kill the newest valid checkpoint must load, and relaunching must continue from it.
At the end the run must equal an uninterrupted run bit for bit: a kill may lose progress since the
last checkpoint, never correctness. Three ranks, because from three on a resumed process that
reduced gradients in another order than the uninterrupted run would show (issue 12).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import psutil
import pytest
import torch

from dist_train.checkpoint.catalog import latest_valid_checkpoint
from dist_train.checkpoint.file import load_checkpoint
from tests.helpers.run import (
    assert_ok,
    dtrain,
    load_final_model,
    make_image_h5,
    metric_history,
    start_dtrain,
    write_config,
)

KILLS = 20
NPROC = "3"


def kill_job(proc) -> None:
    """SIGKILL the launcher, torchrun and every worker at once: what a node failure looks like."""
    try:
        parent = psutil.Process(proc.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return max(steps, default=0)


def reached_step(run_dir: Path, step: int, proc, timeout: float = 180) -> bool:
    """Wait until training logs ``step``; False if the job ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if last_logged_step(run_dir) >= step:
            return True
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def config(tmp_path: Path, name: str, data: Path) -> Path:
    return write_config(
        tmp_path / f"{name}.toml",
        data,
        run={"name": name, "output_dir": str(tmp_path / "runs"), "seed": 2, "deterministic": True},
        data={"batch_size": 8, "num_workers": 0},
        # Big enough that checkpoint writes take a while, so some kills land inside them.
        model={"name": "mlp", "num_classes": 3, "hidden": [768, 768]},
        # 10 epochs of 20 steps: a kill moves the run on by a few steps plus up to 0.3 s of steps, so 20
        # kills need well over 100 steps on a quiet machine (CI once finished 5 epochs after 19 kills).
        train={"epochs": 10, "log_every": 1, "precision": "fp32"},
        checkpoint={"every_steps": 3, "keep_last": 2},
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 22+ launches of 3 ranks: past the default 600 s on a loaded 2-core machine
def test_random_sigkills_never_break_resume(tmp_path: Path) -> None:
    rng = random.Random(1234)
    data = make_image_h5(tmp_path / "d.h5", events=600)
    ref = config(tmp_path, "ref", data)
    assert_ok(
        dtrain("launch", "--gpus", "cpu", "--nproc", NPROC, str(ref), "--run-dir", str(tmp_path / "ref"), cwd=tmp_path)
    )

    cfg = config(tmp_path, "killed", data)
    run_dir = tmp_path / "killed"
    args = ("launch", "--gpus", "cpu", "--nproc", NPROC, str(cfg), "--run-dir", str(run_dir))
    kills = torn_writes = 0
    steps_seen: list[int] = []
    while kills < KILLS:
        proc = start_dtrain(*args, cwd=tmp_path)
        # Kill a few steps past the furthest point reached so far (so every trial makes progress), plus
        # a random fraction of a step: kills land in forward/backward, collectives and checkpoint writes.
        target = last_logged_step(run_dir) + rng.randint(1, 3)
        if not reached_step(run_dir, target, proc):
            assert proc.returncode == 0, proc.stdout.read()
            break  # finished before this kill: nothing left to interrupt
        time.sleep(rng.uniform(0.0, 0.3))
        kill_job(proc)
        kills += 1
        ckpt_dir = run_dir / "checkpoints"
        torn_writes += any(p.name.endswith(".tmp") for p in ckpt_dir.glob("*")) if ckpt_dir.exists() else 0
        latest = latest_valid_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
        if latest is not None:
            state = load_checkpoint(latest)
            assert set(state["model"]) == set(load_final_model(tmp_path / "ref")["model"])
            steps_seen.append(state["step"])
    assert kills == KILLS, f"the run finished after {kills} kills; make it longer"
    assert steps_seen == sorted(steps_seen), "a later kill must never move the resume point backwards"
    assert len(set(steps_seen)) >= KILLS // 3, f"kills should interrupt a progressing run: {steps_seen}"
    assert_ok(dtrain(*args, cwd=tmp_path, timeout=600))

    final, expected = load_final_model(run_dir), load_final_model(tmp_path / "ref")
    for name, tensor in expected["model"].items():
        assert torch.equal(final["model"][name], tensor), name
    assert metric_history(run_dir) == metric_history(tmp_path / "ref")
    leftover = [p for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])]
    assert not leftover, f"processes of the killed job survived: {leftover}"
    print(f"{kills} kills, {torn_writes} left a torn temporary file behind, resume points: {steps_seen}")
