"""`dtrain launch` when things go wrong: real torchrun + gloo processes on the CPU, real signals.

Each launch costs ~10 s of CPU, so every test here starts at most two jobs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from dist_train.envvars import PREEMPTED_EXIT_CODE
from tests.helpers.run import assert_ok, dtrain, make_image_h5, only_run_dir, start_dtrain, write_config

# make_image_h5's default sample shape (2, 6, 6), flattened: the test models take it explicitly.
IN_FEATURES = 72
# Where the test models raise: reports name the model's own file and line.
FAULTY_MLP_FILE = Path(__file__).resolve().parent / "helpers" / "models.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_h5(tmp_path_factory.mktemp("data") / "d.h5", events=200)


def faulty_config(tmp_path: Path, data: Path, mode: str, **extra: dict[str, Any]) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "model": {
            "name": "tests.helpers.models:FaultyMLP",
            "num_classes": 3,
            "in_features": IN_FEATURES,
            "mode": mode,
            "rank": 1,
            "after": 3,
        },
        "train": {"epochs": 1, "log_every": 1, "precision": "fp32"},
        "launch": {"pg_timeout": 30},
    }
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    return write_config(tmp_path / "c.toml", data, **sections)


def slow_config(tmp_path: Path, data: Path, epochs: int = 4) -> Path:
    return write_config(
        tmp_path / "slow.toml",
        data,
        model={"name": "tests.helpers.models:SlowMLP", "num_classes": 3, "in_features": IN_FEATURES, "delay": 0.3},
        train={"epochs": epochs, "log_every": 1, "precision": "fp32"},
        launch={"pg_timeout": 30},
    )


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def wait_for_step(
    runs: Path, step: int, proc: subprocess.Popen[str], timeout: float = 240, pattern: str = "*/*/metrics.jsonl"
) -> Path:
    """Poll metrics.jsonl until training reached ``step`` (the job must still be running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (
            f"launcher exited early ({proc.returncode}):\n{proc.stdout.read() if proc.stdout else ''}"
        )
        for metrics in runs.glob(pattern):
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return metrics.parent
        time.sleep(0.2)
    raise AssertionError(f"training did not reach step {step} in {timeout} s")


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


# ----------------------------------------------------------------------------------- worker failures


def test_exception_in_rank_1_is_reported_with_rank_message_and_log(tmp_path: Path, data: Path) -> None:
    cfg = faulty_config(tmp_path, data, "raise")
    proc = dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), cwd=tmp_path)
    assert_ok(proc, 1)
    run_dir = only_run_dir(tmp_path / "runs")
    report = proc.stderr.strip().splitlines()[-1]
    assert report.startswith("dtrain: rank 1 exited with code 1: RuntimeError: injected failure on rank 1"), report
    assert f"at {FAULTY_MLP_FILE}:" in report and "(in forward)" in report, "the model's line that raised"
    assert f"Its log: {run_dir / 'logs' / 'rank1.log'}" in report
    assert "injected failure on rank 1" in (run_dir / "logs" / "rank1.log").read_text(), "its traceback"
    # Rank 0 only lost its peer: its connection error stays in its own log, off the console.
    text = output(proc)
    assert "Traceback" not in text and "Connection closed by peer" not in text, text
    assert "[rank1]" not in text, "only rank 0 should reach the console"
    assert (run_dir / "logs" / "launcher.log").read_text().strip().endswith(report), "the verdict is kept in the run"


def test_a_forward_raising_on_rank_1_in_the_dry_pass_names_rank_1(tmp_path: Path, data: Path) -> None:
    """Rank 1's model raises in the dry forward pass; rank 0 then dies of a broken DDP collective.
    The report is rank 1's own exception (type, message, the model's line) and log, once; rank 0's
    connection error is not shown as the failure, --verbose shows both tracebacks."""
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        model={"name": "tests.helpers.models:RaisingMLP", "num_classes": 3, "in_features": IN_FEATURES, "rank": 1},
        launch={"pg_timeout": 30},
    )
    proc = dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2, output(proc)
    run_dir = only_run_dir(tmp_path / "runs")
    text = output(proc)
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, text
    report = errors[0]
    assert report.startswith(
        "dtrain: error: rank 1: model 'tests.helpers.models:RaisingMLP' raised RuntimeError: boom at "
        f"{FAULTY_MLP_FILE}:"
    ), report
    assert "(in forward: `raise RuntimeError(self.message)`)" in report and "cannot take samples" not in report
    assert f"Its log: {run_dir / 'logs' / 'rank1.log'}" in report
    assert "Rank 0 was cut off from it" in report
    assert "Traceback" not in text and "Connection closed by peer" not in text, text
    assert "Connection closed by peer" in (run_dir / "logs" / "rank0.log").read_text(), "the victim's own log keeps it"

    verbose = dtrain(
        "--verbose", "launch", "--gpus", "cpu", "--nproc", "2", "--resume", "never", str(cfg), cwd=tmp_path
    )
    assert verbose.returncode == 2, output(verbose)
    assert "--- rank 0:" in verbose.stderr and "Connection closed by peer" in verbose.stderr, output(verbose)


def test_own_failures_come_before_ranks_that_lost_a_failed_peer() -> None:
    """Rank 0's collective broke when rank 2 died with its own exception; torchrun records rank 0 first
    (an earlier timestamp, a lower rank): the report must still name rank 2."""
    from launcher.execute import _root_cause, lost_a_peer

    gloo = "RuntimeError: [gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:52890."
    failures = [
        {"rank": 0, "exitcode": 1, "signal": "", "timestamp": 100, "failed_at": 100.1, "message": gloo},
        {"rank": 1, "exitcode": -15, "signal": "SIGTERM", "timestamp": 100, "message": ""},
        {"rank": 2, "exitcode": 1, "signal": "", "timestamp": 100, "failed_at": 100.4, "message": "KeyError: 'x'"},
        {
            "rank": 3,
            "exitcode": 1,
            "signal": "",
            "timestamp": 100,
            "failed_at": 100.2,
            "message": '{"message": "DistBackendError: NCCL communicator was aborted on rank 3."}',
        },
    ]
    assert [lost_a_peer(f) for f in failures] == [True, False, False, True]
    assert _root_cause(failures)["rank"] == 2
    own = [
        *failures,
        {"rank": 4, "exitcode": 1, "signal": "", "timestamp": 100, "failed_at": 100.3, "message": "ValueError"},
    ]
    assert _root_cause(own)["rank"] == 4, "of two own failures in one second, the earlier"


def test_sigkilled_rank_is_reported_as_killed(tmp_path: Path, data: Path) -> None:
    cfg = faulty_config(tmp_path, data, "sigkill")
    proc = dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), cwd=tmp_path)
    assert_ok(proc, 1)
    assert "dtrain: rank 1 was killed by SIGKILL" in proc.stderr
    assert "rank1.log" in proc.stderr


def test_hung_rank_is_ended_by_the_watchdog_and_reported(tmp_path: Path, data: Path) -> None:
    cfg = faulty_config(tmp_path, data, "hang", launch={"hang_timeout": 3, "pg_timeout": 120})
    proc = dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), cwd=tmp_path, timeout=240)
    assert_ok(proc, 1)
    assert "made no progress for 3 s (launch.hang_timeout)" in proc.stderr, proc.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    stacks = run_dir / "logs" / "rank1.stacks"
    dump = stacks.read_text()
    assert "Timeout (0:00:03)!" in dump
    assert "tests/helpers/models.py" in dump, "the hung rank's stack shows where it hangs"
    assert f"rank 1: {stacks}" in proc.stderr, "the report points at the hung rank's stack dump"
    # The healthy rank armed its watchdog too. Whether its own timer fires before torchrun ends it
    # depends on when it entered the collective (CI under load: torchrun came first), so its file is
    # either empty or a timeout dump, never anything else.
    healthy = run_dir / "logs" / "rank0.stacks"
    assert healthy.exists(), "every rank arms its watchdog"
    assert healthy.read_text() == "" or "Timeout (0:00:03)!" in healthy.read_text()


@pytest.mark.slow
def test_max_restarts_restarts_and_resumes_from_the_latest_checkpoint(tmp_path: Path, data: Path) -> None:
    # 5 steps per epoch; checkpoints every 2 steps. Every start makes one training-mode forward
    # before step 1 (DDP's bucket settling), so rank 1 fails on its 5th forward, in step 4. The
    # restart resumes at step 2 and needs only 1 + 3 forwards: it finishes unless it starts from scratch.
    cfg = faulty_config(tmp_path, data, "raise", checkpoint={"every_steps": 2, "keep_last": 3}, model={"after": 4})
    proc = dtrain("launch", "--gpus", "cpu", "--nproc", "2", "--max-restarts", "1", str(cfg), cwd=tmp_path)
    assert_ok(proc)
    run_dir = only_run_dir(tmp_path / "runs")
    assert (run_dir / "completed").exists()
    assert list((run_dir / "launcher" / "torchrun").glob("*/attempt_1")), "torchrun should have restarted once"
    assert "resumed from" in (run_dir / "logs" / "rank0.log").read_text()


# ----------------------------------------------------------------------------------- stop signals


@pytest.mark.slow
def test_sigterm_to_launcher_checkpoints_leaves_no_orphans_and_relaunch_resumes(tmp_path: Path, data: Path) -> None:
    cfg = slow_config(tmp_path, data)
    args = ("launch", "--gpus", "cpu", "--nproc", "2", str(cfg))
    launcher = start_dtrain(*args, cwd=tmp_path)
    run_dir = wait_for_step(tmp_path / "runs", 2, launcher)
    procs = descendants(launcher.pid)
    assert len(procs) >= 3, procs  # torchrun + 2 workers
    launcher.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=180)
    assert launcher.returncode == PREEMPTED_EXIT_CODE, out
    assert "stopped at step" in out and "run the same command again to resume" in out
    assert alive(procs) == [], "every torchrun/worker process must be gone when the launcher exits"
    assert (run_dir / "preempted").exists()
    stopped_at = int((run_dir / "preempted").read_text().split()[1])
    assert stopped_at >= 2

    again = dtrain(*args, cwd=tmp_path, timeout=300)
    assert_ok(again)
    assert f"resuming run in {run_dir}" in again.stderr
    assert (run_dir / "completed").exists() and not (run_dir / "preempted").exists()
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert f"step {stopped_at}, mid-epoch" in log or f"step {stopped_at}, epoch boundary" in log


@pytest.mark.slow
def test_launcher_killed_by_sigkill_takes_the_workers_down(tmp_path: Path, data: Path) -> None:
    cfg = slow_config(tmp_path, data, epochs=20)
    launcher = start_dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), cwd=tmp_path)
    run_dir = wait_for_step(tmp_path / "runs", 1, launcher)
    procs = descendants(launcher.pid)
    assert len(procs) >= 3, procs
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=30)
    # torchrun gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and stops the workers gracefully.
    _, still = psutil.wait_procs(procs, timeout=150)
    assert alive(still) == []
    assert (run_dir / "preempted").exists(), "the workers should have checkpointed on the way out"


# ----------------------------------------------------------------------------------- bad input


def _assert_one_paragraph_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, output(proc)
    text = output(proc)
    assert "Traceback" not in text
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_config_errors_fail_before_any_process_starts(tmp_path: Path, data: Path) -> None:
    good = write_config(tmp_path / "good.toml", data)
    text = good.read_text()

    (tmp_path / "typo.toml").write_text(text.replace("batch_size", "batch_sise"))
    _assert_one_paragraph_error(
        dtrain("launch", "--gpus", "cpu", "typo.toml", cwd=tmp_path), "batch_sise", "batch_size"
    )

    (tmp_path / "type.toml").write_text(text.replace("epochs = 2", 'epochs = "two"'))
    _assert_one_paragraph_error(dtrain("launch", "--gpus", "cpu", "type.toml", cwd=tmp_path), "epochs")

    _assert_one_paragraph_error(
        dtrain("launch", "--gpus", "cpu", str(good), "--set", "optim.lr", cwd=tmp_path), "optim.lr"
    )
    _assert_one_paragraph_error(dtrain("launch", "--gpus", "cpu", "missing.toml", cwd=tmp_path), "missing.toml")

    (tmp_path / "nodata.toml").write_text(text.replace(str(data), str(tmp_path / "nope.h5")))
    _assert_one_paragraph_error(dtrain("launch", "--gpus", "cpu", "nodata.toml", cwd=tmp_path), "nope.h5")

    (tmp_path / "nokey.toml").write_text(text.replace('x_key = "event_data"', 'x_key = "hits"'))
    _assert_one_paragraph_error(dtrain("launch", "--gpus", "cpu", "nokey.toml", cwd=tmp_path), "hits")

    (tmp_path / "blocker").write_text("a file where the run directory should go")
    _assert_one_paragraph_error(
        dtrain("launch", "--gpus", "cpu", str(good), "--run-dir", str(tmp_path / "blocker" / "run"), cwd=tmp_path),
        "blocker",
    )
    assert not (tmp_path / "runs").exists(), "a failed pre-flight must not leave a run directory behind"


@pytest.mark.slow
def test_workers_orphaned_by_a_killed_torchrun_are_stopped_by_the_launcher(tmp_path: Path, data: Path) -> None:
    cfg = slow_config(tmp_path, data, epochs=20)
    launcher = start_dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), cwd=tmp_path)
    run_dir = wait_for_step(tmp_path / "runs", 1, launcher)
    procs = descendants(launcher.pid)
    (torchrun,) = [p for p in psutil.Process(launcher.pid).children() if "launcher.torchrun_main" in p.cmdline()]
    torchrun.kill()  # what the OOM killer does: torchrun cannot forward anything
    out, _ = launcher.communicate(timeout=180)
    assert "torchrun exited (killed by SIGKILL) but" in out, out
    assert alive(procs) == []
    # The orphaned workers got SIGTERM from the launcher, so they still checkpointed.
    assert launcher.returncode == PREEMPTED_EXIT_CODE, out
    assert (run_dir / "preempted").exists()


def test_a_killed_rank_is_the_cause_even_if_a_peer_raised_first() -> None:
    """Rank 1 SIGKILLed; rank 0's collective then fails with a connection error, which torchrun may
    record first. The report must name the killed rank."""
    from launcher.execute import _root_cause

    failures = [
        {
            "rank": 0,
            "exitcode": 1,
            "signal": None,
            "timestamp": 100,
            "message": "RuntimeError: Connection closed by peer",
        },
        {"rank": 1, "exitcode": -9, "signal": "SIGKILL", "timestamp": 101, "message": "Signal 9 (SIGKILL)"},
        {"rank": 2, "exitcode": -15, "signal": "SIGTERM", "timestamp": 99, "message": ""},
    ]
    assert _root_cause(failures)["rank"] == 1
    assert _root_cause(failures[::2])["rank"] == 0, "an own failure still comes before a torn-down rank"


def test_a_report_of_victims_only_says_the_cause_is_elsewhere(tmp_path: Path) -> None:
    """On one node of a multi-node job every local rank may only have lost a peer on another node."""
    from launcher.execute import failure_report
    from launcher.plan import LaunchPlan, Topology

    summary = tmp_path / "failures.json"
    gloo = "RuntimeError: [pair.cc:561] Connection closed by peer [10.0.0.2]:52890."
    summary.write_text(
        json.dumps(
            {
                "status": "failed",
                "failures": [
                    {"rank": 5, "exitcode": 1, "signal": "", "timestamp": 100, "message": gloo},
                    {"rank": 4, "exitcode": 1, "signal": "", "timestamp": 100, "message": gloo},
                ],
            }
        )
    )
    plan = LaunchPlan(
        argv=(),
        env=(),
        run_dir=str(tmp_path),
        backend="torchrun",
        topology=Topology(nproc_per_node=2, nnodes=2, node_rank=1),
        cuda_visible_devices=None,
        summary_file=str(summary),
    )
    report = failure_report(plan, 1)
    assert report.startswith("dtrain: rank 4 exited with code 1: RuntimeError:"), report
    assert "Rank 5 was cut off from it" in report
    assert (
        f"which failed first (on another node, or without an error record): look for it in the logs in {tmp_path / 'logs'}"
        in report
    )
