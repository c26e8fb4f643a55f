"""GPU choice through `dtrain launch` with recorded NVML states (DTRAIN_NVML_RECORD) and real flock locks.

The recorded GPUs do not exist, so real launches still train on the CPU (torch sees no CUDA); what
is checked is which GPUs the launcher reserves and hands to the workers.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from dist_train.envvars import PREEMPTED_EXIT_CODE
from tests.helpers.run import REPO, dtrain, env_for_tests, make_image_h5, start_dtrain, write_config
from tests.test_launch_failures import IN_FEATURES, alive, wait_for_step

STATES = REPO / "tests" / "gpu_states"


def uuids(state: str) -> dict[int, str]:
    return {g["index"]: g["uuid"] for g in json.loads((STATES / state).read_text())["gpus"]}


@pytest.fixture()
def cfg(tmp_path: Path) -> Path:
    data = make_image_h5(tmp_path / "d.h5", events=200)
    return write_config(
        tmp_path / "c.toml",
        data,
        model={"name": "tests.helpers.models:SlowMLP", "num_classes": 3, "in_features": IN_FEATURES, "delay": 0.3},
        train={"epochs": 60, "log_every": 1, "precision": "fp32"},
        launch={"pg_timeout": 30},
    )


def launch_args(cfg: Path, gpus: str, *extra: str) -> list[str]:
    return ["launch", str(cfg), "--gpus", gpus, "--lock-dir", str(cfg.parent / "locks"), *extra]


def env(state: str) -> dict[str, str]:
    return env_for_tests({"DTRAIN_NVML_RECORD": str(STATES / state)})


def dry_run(cfg: Path, state: str, gpus: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = dtrain(*launch_args(cfg, gpus, "--dry-run"), cwd=cfg.parent, env=env(state))
    plan = json.loads(proc.stdout) if proc.returncode == 0 else {}
    return proc, plan


def visible(plan: dict[str, Any]) -> list[str]:
    return dict(plan["env"])["CUDA_VISIBLE_DEVICES"].split(",")


def test_two_gpus_of_eight_give_a_two_process_plan_pinned_by_uuid(cfg: Path) -> None:
    proc, plan = dry_run(cfg, "free8.json", "2")
    assert proc.returncode == 0, proc.stderr
    assert "--nproc-per-node=2" in plan["argv"]
    chosen = visible(plan)
    assert len(set(chosen)) == 2 and set(chosen) <= set(uuids("free8.json").values())
    assert "DTRAIN_DEVICE" not in dict(plan["env"])
    assert "dtrain: reserved GPU" in proc.stderr


def test_busy_gpus_are_skipped_and_refused_when_named(cfg: Path) -> None:
    ids = uuids("busy_process.json")  # GPUs 0 and 2 run other users' processes
    proc, plan = dry_run(cfg, "busy_process.json", "2")
    assert proc.returncode == 0, proc.stderr
    assert sorted(visible(plan)) == sorted([ids[1], ids[3]])

    refused, _ = dry_run(cfg, "busy_process.json", "0,1")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "GPU 0" in refused.stderr or ids[0] in refused.stderr, refused.stderr

    missing, _ = dry_run(cfg, "free8.json", "1,9")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "9" in missing.stderr


def test_auto_without_gpus_runs_on_the_cpu_with_a_notice(cfg: Path) -> None:
    proc, plan = dry_run(cfg, "none.json", "auto")
    assert proc.returncode == 0, proc.stderr
    notices = [line for line in proc.stderr.splitlines() if "running on the CPU" in line]
    assert len(notices) == 1
    env_vars = dict(plan["env"])
    assert env_vars["CUDA_VISIBLE_DEVICES"] == "" and env_vars["DTRAIN_DEVICE"] == "cpu"
    assert "--nproc-per-node=1" in plan["argv"]


def worker_envs(launcher_pid: int) -> list[dict[str, str]]:
    out = []
    for p in psutil.Process(launcher_pid).children(recursive=True):
        cmd = p.cmdline()
        if "dist_train" in cmd and "launcher.torchrun_main" not in cmd:
            out.append(p.environ())
    return out


@pytest.mark.slow
def test_concurrent_launches_get_different_gpus_and_ports_and_release_them(cfg: Path) -> None:
    tmp = cfg.parent
    first = start_dtrain(*launch_args(cfg, "1"), cwd=tmp, env=env("free8.json"))
    second: subprocess.Popen[str] | None = None
    try:
        wait_for_step(tmp / "runs", 1, first)
        (a_env,) = worker_envs(first.pid)

        proc, plan = dry_run(cfg, "free8.json", "1")
        assert proc.returncode == 0, proc.stderr
        assert visible(plan) != [a_env["CUDA_VISIBLE_DEVICES"]], "a reserved GPU must not be offered again"

        # A second real job of the same config: another GPU, its own run directory and rendezvous port.
        second = start_dtrain(*launch_args(cfg, "1", "--resume", "never"), cwd=tmp, env=env("free8.json"))
        b_env: dict[str, str] = {}
        for _ in range(600):
            envs = worker_envs(second.pid)
            if envs and "MASTER_PORT" in envs[0]:
                b_env = envs[0]
                break
            assert second.poll() is None
            time.sleep(0.2)
        assert b_env, "the second job's worker did not start"
        assert b_env["CUDA_VISIBLE_DEVICES"] != a_env["CUDA_VISIBLE_DEVICES"]
        assert b_env["MASTER_PORT"] != a_env["MASTER_PORT"]
        assert b_env["DTRAIN_RUN_DIR"] != a_env["DTRAIN_RUN_DIR"]
        # Stop it only once it trains: a worker still starting up has no preemption handler yet.
        wait_for_step(
            Path(b_env["DTRAIN_RUN_DIR"]).parent,
            1,
            second,
            pattern=f"{Path(b_env['DTRAIN_RUN_DIR']).name}/metrics.jsonl",
        )
        assert len(list((tmp / "runs" / "t").iterdir())) == 2

        procs = psutil.Process(first.pid).children(recursive=True) + psutil.Process(second.pid).children(recursive=True)
        for launcher in (first, second):
            launcher.send_signal(signal.SIGTERM)
        for launcher in (first, second):
            out, _ = launcher.communicate(timeout=180)
            assert launcher.returncode == PREEMPTED_EXIT_CODE, out
        assert alive(procs) == []
    finally:
        for launcher in (first, second):
            if launcher is not None and launcher.poll() is None:
                launcher.kill()
                launcher.wait()

    released, plan = dry_run(cfg, "free8.json", "8")
    assert released.returncode == 0, f"all GPU locks should be free again: {released.stderr}"
    assert len(visible(plan)) == 8


# ----------------------------------------------------------------------------------- --debug: one process


def debug_dry_run(cfg: Path, state: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    args = ["launch", str(cfg), "--debug", "--lock-dir", str(cfg.parent / "locks"), "--dry-run", *extra]
    proc = dtrain(*args, cwd=cfg.parent, env=env(state))
    plan = json.loads(proc.stdout) if proc.returncode == 0 else {}
    return proc, plan


def assert_one_plain_process(plan: dict[str, Any]) -> None:
    assert plan["backend"] == "debug" and plan["argv"][1:3] == ["-m", "dist_train"], plan["argv"]
    assert not any("torchrun" in a for a in plan["argv"]) and plan["topology"]["nproc_per_node"] == 1
    assert dict(plan["env"])["DTRAIN_DEBUG"] == "1" and plan["run_dir"].endswith("-debug")


@pytest.mark.parametrize(
    ("state", "extra", "index"),
    [
        ("free8.json", (), 0),  # free: the first free GPU, not all eight
        ("busy_process.json", (), 1),  # GPU 0 runs another user's process
        ("free8.json", ("--gpus", "3,"), 3),  # an explicit index
        ("busy_process.json", ("--gpus", "1"), 1),  # a count of one
    ],
)
def test_debug_takes_one_free_gpu_and_locks_it(cfg: Path, state: str, extra: tuple[str, ...], index: int) -> None:
    proc, plan = debug_dry_run(cfg, state, *extra)
    assert proc.returncode == 0, proc.stderr
    assert_one_plain_process(plan)
    env_vars = dict(plan["env"])
    assert env_vars["CUDA_VISIBLE_DEVICES"] == uuids(state)[index] and "DTRAIN_DEVICE" not in env_vars
    assert f"dtrain: reserved GPU {index} ({uuids(state)[index]})" in proc.stderr
    assert "running on the CPU" not in proc.stderr


@pytest.mark.parametrize(
    ("state", "extra", "notice"), [("none.json", (), True), ("free8.json", ("--gpus", "cpu"), False)]
)
def test_debug_runs_on_the_cpu_without_gpus_or_when_asked(
    cfg: Path, state: str, extra: tuple[str, ...], notice: bool
) -> None:
    proc, plan = debug_dry_run(cfg, state, *extra)
    assert proc.returncode == 0, proc.stderr
    assert_one_plain_process(plan)
    env_vars = dict(plan["env"])
    assert env_vars["CUDA_VISIBLE_DEVICES"] == "" and env_vars["DTRAIN_DEVICE"] == "cpu"
    # The same notice as a normal launch that finds no GPU; none when the CPU was asked for.
    assert len(
        [line for line in proc.stderr.splitlines() if "no GPUs found" in line and "running on the CPU" in line]
    ) == int(notice)
    assert "reserved GPU" not in proc.stderr


@pytest.mark.parametrize(
    ("state", "extra", "expected"),
    [
        ("all_busy.json", (), "Not enough free GPUs: asked for one free GPU"),
        ("busy_process.json", ("--gpus", "0,"), "Requested GPU(s) not available: GPU 0"),
        ("free8.json", ("--gpus", "2"), "--gpus '2' asks for 2 GPUs, but --debug runs one process"),
        ("free8.json", ("--gpus", "0,3"), "--gpus '0,3' asks for 2 GPUs, but --debug runs one process"),
        ("free8.json", ("--gpus", "cpu", "--nproc", "2"), "--nproc 2 with --debug: debug mode runs one process"),
    ],
)
def test_debug_refuses_busy_gpus_and_more_than_one_process(
    cfg: Path, state: str, extra: tuple[str, ...], expected: str
) -> None:
    proc, _ = debug_dry_run(cfg, state, *extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_debug_cuts_a_configured_gpu_count_down_to_one(cfg: Path) -> None:
    cfg.write_text(cfg.read_text().replace("[launch]", '[launch]\ngpus = "4"'))
    proc, plan = debug_dry_run(cfg, "free8.json")
    assert proc.returncode == 0, proc.stderr
    assert dict(plan["env"])["CUDA_VISIBLE_DEVICES"] == uuids("free8.json")[0]
    assert "--debug runs one process: --gpus 1 instead of launch.gpus = '4'" in proc.stderr


def gpus_json(cfg: Path, state: str) -> list[dict[str, Any]]:
    proc = dtrain("gpus", "--json", "--lock-dir", str(cfg.parent / "locks"), cwd=cfg.parent, env=env(state))
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout)["gpus"])


def test_a_debug_run_holds_its_gpu_like_any_job_and_releases_it_on_ctrl_c(cfg: Path) -> None:
    from launcher.run_dirs import is_debug_run, is_in_use

    tmp = cfg.parent
    launcher = start_dtrain(
        "launch", str(cfg), "--debug", "--lock-dir", str(tmp / "locks"), cwd=tmp, env=env("free8.json")
    )
    try:
        run_dir = wait_for_step(tmp / "runs", 1, launcher)
        assert run_dir.name.endswith("-debug") and is_debug_run(run_dir)
        assert is_in_use(run_dir), "the run lock is held while the debug run runs"
        gpus = gpus_json(cfg, "free8.json")
        held = [g for g in gpus if g["reserved_by"]]
        assert [g["index"] for g in held] == [0], held
        holder = held[0]["reserved_by"]
        assert holder["run_dir"] == str(run_dir) and holder["pid"] == launcher.pid
        assert all(g["free"] for g in gpus if g["index"] != 0)
        children = psutil.Process(launcher.pid).children(recursive=True)
        assert not any("launcher.torchrun_main" in p.cmdline() for p in children), "no torchrun in debug mode"
        (worker,) = [p for p in children if "dist_train" in p.cmdline()]
        assert worker.environ()["CUDA_VISIBLE_DEVICES"] == uuids("free8.json")[0]
        assert worker.environ()["DTRAIN_DEBUG"] == "1"
        launcher.send_signal(signal.SIGINT)
        out, _ = launcher.communicate(timeout=120)
        assert launcher.returncode == PREEMPTED_EXIT_CODE, out
        assert alive(children) == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert not any(g["reserved_by"] for g in gpus_json(cfg, "free8.json")), "the GPU is released"
    assert not is_in_use(run_dir)


def test_debug_inside_a_slurm_step_uses_the_first_gpu_slurm_gave_it(cfg: Path) -> None:
    """SLURM owns the allocation: no NVML search and no locks, one of this node's GPUs."""
    step = {
        "SLURM_JOB_ID": "4711",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "0",
        "SLURM_NODEID": "0",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_STEP_NUM_TASKS": "1",
        "CUDA_VISIBLE_DEVICES": "2,3",
    }
    args = ["launch", str(cfg), "--debug", "--lock-dir", str(cfg.parent / "locks"), "--dry-run"]
    proc = dtrain(*args, cwd=cfg.parent, env=env_for_tests({**step, "DTRAIN_NVML_RECORD": str(STATES / "free8.json")}))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert_one_plain_process(plan)
    env_vars = dict(plan["env"])
    assert env_vars["CUDA_VISIBLE_DEVICES"] == "2" and env_vars["DTRAIN_JOB_ID"] == "slurm-4711"
    assert "reserved GPU" not in proc.stderr and not (cfg.parent / "locks").exists()
