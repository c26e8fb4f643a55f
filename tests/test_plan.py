"""Launch plans (argv + env, no process started), run-directory locks and failure reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dist_train.envvars import PREEMPTED_EXIT_CODE
from dist_train.errors import ConfigError, LaunchError
from launcher import plan as plans
from launcher.execute import interpret
from launcher.run_dirs import (
    DEBUG_MARKER,
    check_resume_source,
    check_run_kind,
    is_debug_run,
    lock_run_dir,
    new_run_dir,
    newest_resumable_run,
    prepare_run_dir,
)
from tests.helpers.run import REPO, dtrain, make_image_h5, write_config

CFG = Path("/runs/t/1/config.toml")
RUN = Path("/runs/t/1")
UUIDS = "GPU-aaaa,GPU-bbbb"


def torchrun(topology: plans.Topology, cuda: str | None = "", **kw: Any) -> plans.LaunchPlan:
    return plans.torchrun_plan(CFG, RUN, topology, resume="auto", job_id="u@h:1", cuda_visible_devices=cuda, **kw)


def accelerate(topology: plans.Topology, cuda: str | None, precision: str = "auto") -> plans.LaunchPlan:
    return plans.accelerate_plan(
        CFG,
        RUN,
        topology,
        resume="auto",
        job_id="u@h:1",
        cuda_visible_devices=cuda,
        precision=precision,
        main_process_port=29555,
    )


def torchrun_args(plan: plans.LaunchPlan) -> list[str]:
    argv = list(plan.argv)
    return argv[argv.index("--") + 1 :]


# ----------------------------------------------------------------------------------- torchrun


def test_cpu_single_node_plan_is_standalone_and_runs_the_worker_module() -> None:
    plan = torchrun(plans.Topology(nproc_per_node=2))
    assert plan.argv[1:5] == ("-m", "launcher.torchrun_main", "--summary", str(RUN / "launcher" / "failures.json"))
    args = torchrun_args(plan)
    assert "--standalone" in args and "--nproc-per-node=2" in args and "--max-restarts=0" in args
    assert not any(a.startswith(("--rdzv", "--nnodes")) for a in args)
    assert args[-3:] == ["-m", "dist_train", str(CFG)]
    env = plan.env_dict()
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["DTRAIN_DEVICE"] == "cpu"
    assert env["DTRAIN_RUN_DIR"] == str(RUN) and env["DTRAIN_RESUME"] == "auto" and env["DTRAIN_JOB_ID"] == "u@h:1"
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env


def test_gpu_plan_pins_the_reserved_uuids_and_leaves_threads_to_torch() -> None:
    plan = torchrun(plans.Topology(nproc_per_node=2), cuda=UUIDS)
    env = plan.env_dict()
    assert env["CUDA_VISIBLE_DEVICES"] == UUIDS
    assert "DTRAIN_DEVICE" not in env and "OMP_NUM_THREADS" not in env
    assert plan.cuda_visible_devices == UUIDS


def test_multi_node_plan_uses_c10d_rendezvous() -> None:
    topo = plans.Topology(nproc_per_node=4, nnodes=2, node_rank=1, rdzv_endpoint="node001:29400", rdzv_id="job7")
    args = torchrun_args(torchrun(topo, cuda=None))
    assert "--standalone" not in args
    for expected in (
        "--nnodes=2",
        "--node-rank=1",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node001:29400",
        "--rdzv-id=job7",
        "--nproc-per-node=4",
    ):
        assert expected in args
    assert "CUDA_VISIBLE_DEVICES" not in torchrun(topo, cuda=None).env_dict(), "SLURM's own devices are inherited"


def test_restarts_are_passed_through_with_a_fresh_store_per_attempt() -> None:
    plan = torchrun(plans.Topology(nproc_per_node=2), max_restarts=3)
    assert "--max-restarts=3" in torchrun_args(plan)
    assert plan.env_dict()["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


@pytest.mark.parametrize(
    ("nproc", "console", "expected"),
    [(2, "0", "--redirects=1:3"), (4, "0,2", "--redirects=1:3,3:3"), (4, "all", None), (1, "0", None)],
)
def test_only_console_ranks_stay_on_the_terminal(nproc: int, console: str, expected: str | None) -> None:
    args = torchrun_args(torchrun(plans.Topology(nproc_per_node=nproc), console_ranks=console))
    redirects = [a for a in args if a.startswith("--redirects")]
    assert redirects == ([expected] if expected else [])


def test_debug_plan_is_one_plain_process() -> None:
    plan = plans.debug_plan(CFG, RUN, resume="never", job_id="j")
    # Tracebacks of bad-input errors only with `dtrain --verbose launch --debug`.
    assert plan.argv[1:] == ("-m", "dist_train", str(CFG))
    assert plans.debug_plan(CFG, RUN, resume="never", job_id="j", verbose=True).argv[-1] == "--verbose"
    env = plan.env_dict()
    assert env["DTRAIN_DEBUG"] == "1" and env["DTRAIN_DEVICE"] == "cpu" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert plan.backend == "debug" and not plan.summary_file
    assert plan.topology == plans.Topology(nproc_per_node=1)


def test_debug_plan_on_a_reserved_gpu_pins_it_and_does_not_force_the_cpu() -> None:
    plan = plans.debug_plan(CFG, RUN, resume="auto", job_id="j", cuda_visible_devices="GPU-aaaa")
    assert plan.argv[1:] == ("-m", "dist_train", str(CFG)), "no torchrun, no process group"
    env = plan.env_dict()
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa" and plan.cuda_visible_devices == "GPU-aaaa"
    assert env["DTRAIN_DEBUG"] == "1" and "DTRAIN_DEVICE" not in env
    assert not any(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"))
    assert plan.full_env({"CUDA_VISIBLE_DEVICES": "0,1,2"})["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa"


def test_inherited_rank_variables_are_scrubbed() -> None:
    plan = torchrun(plans.Topology(nproc_per_node=2))
    base = {
        "PATH": "/bin",
        "RANK": "3",
        "WORLD_SIZE": "9",
        "MASTER_PORT": "1",
        "TORCHELASTIC_RUN_ID": "x",
        "CUDA_VISIBLE_DEVICES": "5",
    }
    env = plan.full_env(base)
    assert env["PATH"] == "/bin" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT", "TORCHELASTIC_RUN_ID"} & set(env)


def test_plan_json_round_trips() -> None:
    plan = torchrun(plans.Topology(nproc_per_node=2), hang_timeout=30)
    data = json.loads(plan.to_json())
    assert data["argv"] == list(plan.argv) and dict(data["env"]) == plan.env_dict()
    assert data["hang_timeout"] == 30 and data["topology"]["nproc_per_node"] == 2


# ----------------------------------------------------------------------------------- accelerate


def test_accelerate_cpu_with_two_processes_uses_the_multi_process_launcher() -> None:
    plan = accelerate(plans.Topology(nproc_per_node=2), cuda="")
    argv = list(plan.argv)
    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    assert "--num_processes=2" in argv and "--multi_gpu" in argv and "--mixed_precision=no" in argv
    assert "--cpu" not in argv, "accelerate's --cpu would start one process only"
    assert argv[-3:] == ["--module", "dist_train", str(CFG)]
    assert plan.env_dict()["DTRAIN_DEVICE"] == "cpu"


def test_accelerate_single_cpu_process_and_gpu_multi_node_mapping() -> None:
    assert "--cpu" in accelerate(plans.Topology(nproc_per_node=1), cuda="").argv
    topo = plans.Topology(nproc_per_node=4, nnodes=2, node_rank=1, rdzv_endpoint="node001:29400")
    argv = accelerate(topo, cuda=None, precision="fp16").argv
    for expected in (
        "--num_processes=8",
        "--num_machines=2",
        "--machine_rank=1",
        "--main_process_ip=node001",
        "--main_process_port=29555",
        "--mixed_precision=fp16",
        "--multi_gpu",
    ):
        assert expected in argv
    assert "--mixed_precision=bf16" in accelerate(plans.Topology(nproc_per_node=2), cuda=UUIDS).argv


def test_launcher_modules_do_not_import_torch() -> None:
    code = (
        "import sys, launcher.cli, launcher.plan, launcher.execute, launcher.run_dirs, launcher.cmd_launch; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# ----------------------------------------------------------------------------------- run directories


def test_a_run_in_use_is_locked_and_skipped_by_automatic_resume(tmp_path: Path) -> None:
    older, newer = tmp_path / "t" / "20250101-000000", tmp_path / "t" / "20250102-000000"
    for run in (older, newer):
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "latest").write_text("ckpt.pt")
    assert newest_resumable_run(str(tmp_path), "t") == newer
    _, fd = prepare_run_dir(newer)
    try:
        assert newest_resumable_run(str(tmp_path), "t") == older, "a running job's directory is not resumed twice"
        with pytest.raises(LaunchError, match="in use by another running dtrain launch"):
            lock_run_dir(newer)
    finally:
        assert fd is not None
        os.close(fd)
    assert newest_resumable_run(str(tmp_path), "t") == newer
    (newer / "completed").write_text("step 9\n")
    assert newest_resumable_run(str(tmp_path), "t") == older


def _checkpointed_run(path: Path, *, debug: bool) -> Path:
    run_dir, fd = prepare_run_dir(path, debug=debug)
    assert fd is not None
    os.close(fd)
    (run_dir / "config.toml").write_text("")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "ckpt-e0001-s00000005.pt").write_bytes(b"x")
    (run_dir / "checkpoints" / "latest").write_text("ckpt-e0001-s00000005.pt")
    return run_dir


def test_debug_runs_are_named_and_marked_apart_and_resumed_only_by_their_kind(tmp_path: Path) -> None:
    import datetime

    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    assert new_run_dir(str(tmp_path), "t", now=now) == tmp_path / "t" / "20260102-030405"
    assert new_run_dir(str(tmp_path), "t", now=now, debug=True) == tmp_path / "t" / "20260102-030405-debug"
    normal = _checkpointed_run(tmp_path / "t" / "20250101-000000", debug=False)
    debug = _checkpointed_run(tmp_path / "t" / "20250102-000000-debug", debug=True)
    assert is_debug_run(debug) and not is_debug_run(normal)
    assert "--debug" in (debug / DEBUG_MARKER).read_text()
    # The debug run is the newer one; a normal launch still resumes only the normal run, and the reverse.
    assert newest_resumable_run(str(tmp_path), "t") == normal
    assert newest_resumable_run(str(tmp_path), "t", debug=True) == debug
    (debug / "completed").write_text("step 5\n")
    assert newest_resumable_run(str(tmp_path), "t", debug=True) is None, "never a normal run instead"
    # Relaunching (and so re-preparing) a debug run keeps its mark; a normal preparation adds none.
    _, fd = prepare_run_dir(debug, debug=True)
    assert fd is not None
    os.close(fd)
    assert is_debug_run(debug) and not (debug / "completed").exists()


def test_naming_a_run_of_the_other_kind_is_refused_with_the_way_out(tmp_path: Path) -> None:
    normal = _checkpointed_run(tmp_path / "normal", debug=False)
    debug = _checkpointed_run(tmp_path / "dbg", debug=True)
    check_run_kind(normal, debug=False)
    check_run_kind(debug, debug=True)
    check_run_kind(tmp_path / "new", debug=True)  # nothing there yet: either kind may start it
    (tmp_path / "empty").mkdir()
    check_run_kind(tmp_path / "empty", debug=False)
    with pytest.raises(ConfigError, match=r"holds a --debug run .*a normal launch does not continue it.*add --debug"):
        check_run_kind(debug, debug=False)
    with pytest.raises(ConfigError, match=r"holds a normal \(non-debug\) run; --debug does not write into it"):
        check_run_kind(normal, debug=True)

    debug_ckpt = debug / "checkpoints" / "ckpt-e0001-s00000005.pt"
    normal_ckpt = normal / "checkpoints" / "ckpt-e0001-s00000005.pt"
    with pytest.raises(ConfigError, match=r"written by a --debug run .*--resume never"):
        check_resume_source(debug_ckpt, debug=False)
    check_resume_source(debug_ckpt, debug=True)
    # Debugging from a real run's state is allowed: it runs in a debug directory of its own.
    check_resume_source(normal_ckpt, debug=True)
    check_resume_source(normal_ckpt, debug=False)
    loose = tmp_path / "elsewhere.pt"
    loose.write_bytes(b"x")
    check_resume_source(loose, debug=False)


# ----------------------------------------------------------------------------------- outcomes


def _plan_with_failures(tmp_path: Path, failures: list[dict[str, Any]], hang_timeout: float = 0) -> plans.LaunchPlan:
    plan = plans.torchrun_plan(
        CFG,
        tmp_path,
        plans.Topology(nproc_per_node=2),
        resume="auto",
        job_id="j",
        cuda_visible_devices="",
        hang_timeout=hang_timeout,
    )
    Path(plan.summary_file).parent.mkdir(parents=True, exist_ok=True)
    Path(plan.summary_file).write_text(json.dumps({"status": "failed", "failures": failures}))
    return plan


def _failure(
    rank: int, exitcode: int, *, signal: str = "", message: str = "", ts: int = 100, stderr: str = ""
) -> dict[str, Any]:
    return {
        "rank": rank,
        "exitcode": exitcode,
        "signal": signal,
        "message": message,
        "timestamp": ts,
        "stderr_file": stderr,
    }


def test_the_rank_that_failed_on_its_own_is_reported_before_torn_down_ranks(tmp_path: Path) -> None:
    msg = json.dumps({"message": "RuntimeError: boom", "extraInfo": {"py_callstack": "Traceback ..."}})
    plan = _plan_with_failures(tmp_path, [_failure(0, -15, signal="SIGTERM", ts=99), _failure(1, 1, message=msg)])
    outcome = interpret(plan, 1, stop_requested=False)
    assert outcome.exit_code == 1
    assert outcome.message.startswith("dtrain: rank 1 exited with code 1: RuntimeError: boom. Its log: ")
    assert str(tmp_path / "logs" / "rank1.log") in outcome.message
    assert outcome.message.endswith("Rank 0 was stopped after it.")


def test_a_config_error_in_the_worker_exits_2(tmp_path: Path) -> None:
    msg = json.dumps({"message": "ConfigError: model 'x' could not be built"})
    plan = _plan_with_failures(tmp_path, [_failure(0, 2, message=msg), _failure(1, -15, signal="SIGTERM")])
    outcome = interpret(plan, 1, stop_requested=False)
    # The worker's paragraph once, as the launcher's own errors read (no rank, no class name).
    assert outcome.exit_code == 2 and outcome.message == "dtrain: error: model 'x' could not be built"


def test_hung_ranks_are_reported_together_with_their_stack_dumps(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir(exist_ok=True)
    dump = tmp_path / "logs" / "rank1.stacks"  # where dist_train/watchdog.py writes
    dump.write_text('Timeout (0:00:05)!\nThread 0x1 (most recent call first):\n  File "m.py", line 3 in forward\n')
    plan = _plan_with_failures(tmp_path, [_failure(0, 1), _failure(1, 1)], hang_timeout=5)
    outcome = interpret(plan, 1, stop_requested=False)
    assert outcome.exit_code == 1
    assert outcome.message.startswith("dtrain: ranks 0, 1 made no progress for 5 s (launch.hang_timeout)")
    assert f"rank 1: {dump}" in outcome.message


def test_preempted_marker_means_resumable(tmp_path: Path) -> None:
    plan = _plan_with_failures(tmp_path, [])
    (tmp_path / "preempted").write_text("step 7\n")
    outcome = interpret(plan, 143, stop_requested=True)
    assert outcome.exit_code == PREEMPTED_EXIT_CODE and "step 7" in outcome.message


# ----------------------------------------------------------------------------------- CLI dry runs


def test_multi_node_flags_reach_the_plan_and_are_validated(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", make_image_h5(tmp_path / "d.h5", events=50))
    run_dir = tmp_path / "shared" / "run"
    proc = dtrain(
        "launch",
        str(cfg),
        "--gpus",
        "cpu",
        "--nproc",
        "3",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--rdzv-endpoint",
        "node001:29400",
        "--run-dir",
        str(run_dir),
        "--dry-run",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert "--nnodes=2" in plan["argv"] and "--node-rank=1" in plan["argv"] and "--nproc-per-node=3" in plan["argv"]
    assert "--rdzv-endpoint=node001:29400" in plan["argv"] and "--standalone" not in plan["argv"]
    assert not run_dir.exists() and not (tmp_path / "runs").exists(), "a dry run creates nothing"

    missing = dtrain(
        "launch", str(cfg), "--gpus", "cpu", "--nnodes", "2", "--run-dir", str(run_dir), "--dry-run", cwd=tmp_path
    )
    assert missing.returncode == 2 and "--rdzv-endpoint" in missing.stderr
    no_dir = dtrain(
        "launch", str(cfg), "--gpus", "cpu", "--nnodes", "2", "--rdzv-endpoint", "h:1", "--dry-run", cwd=tmp_path
    )
    assert no_dir.returncode == 2 and "--run-dir" in no_dir.stderr


def test_a_rank_torn_down_while_writing_its_error_file_still_leaves_the_culprit_named(tmp_path: Path) -> None:
    """Seen in CI: rank 0 lost its peer and was stopped by torchrun while writing error.json, which stayed
    empty; torch's agent then raised a JSONDecodeError instead of listing the failures. The wrapper rebuilds
    the record from the error files on disk, so the report still names rank 1 and its exception."""
    from launcher.torchrun_main import _failures_from_error_files

    attempt = tmp_path / "torchrun" / "run-id_x" / "attempt_0"
    (attempt / "0").mkdir(parents=True)
    (attempt / "0" / "error.json").write_text("")  # torn down mid-write
    (attempt / "1").mkdir()
    message = {
        "message": "RuntimeError: injected failure on rank 1",
        "extraInfo": {"py_callstack": "Traceback ...", "timestamp": "1"},
    }
    (attempt / "1" / "error.json").write_text(json.dumps({"message": message}))
    (attempt / "1" / "stderr.log").write_text("Traceback ...\n")
    failures = _failures_from_error_files(str(tmp_path / "torchrun"), first_rank=0)
    assert [(f["rank"], f["exitcode"], f["signal"]) for f in failures] == [(0, -15, "SIGTERM"), (1, 1, "")]
    assert failures[1]["stderr_file"] == str(attempt / "1" / "stderr.log")
    plan = _plan_with_failures(tmp_path, failures)
    outcome = interpret(plan, 1, stop_requested=False)
    assert outcome.exit_code == 1
    assert outcome.message.startswith("dtrain: rank 1 exited with code 1: RuntimeError: injected failure on rank 1"), (
        outcome.message
    )
    assert outcome.message.endswith("Rank 0 was stopped after it."), outcome.message
