"""What a user sees on the console: the progress bar on pseudo-terminals, and Ctrl-C in dtrain's words.

Real pseudo-terminals (Python's pty, as `script` makes them), real launches, real signals.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.helpers.run import DTRAIN, env_for_tests, make_image_h5, only_run_dir, write_config

IN_FEATURES = 72  # make_image_h5's default sample shape (2, 6, 6), flattened
# torchrun's own log lines ("W1127 06:51:37.076000 1234 torch/distributed/...] ...").
TORCH_LOG_LINE = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d", re.MULTILINE)


def run_in_pty(
    argv: list[str], *, cwd: Path, size: tuple[int, int] | None = None, timeout: float = 240
) -> tuple[int, str]:
    """Run argv on a fresh pseudo-terminal; ``size`` = (columns, lines), None leaves it 0 x 0 as
    `script` or Python's pty leave it when there is no terminal around them. Returns (exit code, output)."""
    env = env_for_tests()
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    pid, fd = pty.fork()
    if pid == 0:  # the child: its stdin/stdout/stderr are the terminal
        try:
            os.chdir(cwd)
            if size is not None:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the terminal's other side closed
                break
            if not data:
                break
            chunks.append(data)
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode("utf-8", "replace")


PROGRESS_SCRIPT = """
import sys
from pathlib import Path
from dist_train.logs import Progress, setup_logging

setup_logging(Path(sys.argv[1]), 0, console=True)
progress = Progress(sys.argv[2], enabled=True, log_every=1)
progress.start_epoch(0, 1, 4)
for step in range(1, 5):
    progress.update(step, 1, {"train/loss_running": 1.0 / step})
progress.end_epoch()
"""


def _progress_in_pty(tmp_path: Path, mode: str, size: tuple[int, int] | None) -> tuple[str, str]:
    run_dir = tmp_path / f"{mode}-{size}"
    code, out = run_in_pty([sys.executable, "-c", PROGRESS_SCRIPT, str(run_dir), mode], cwd=tmp_path, size=size)
    assert code == 0, out
    return out, (run_dir / "logs" / "rank0.log").read_text()


@pytest.mark.parametrize("size", [None, (100, 30)], ids=["unsized-pty", "sized-pty"])
@pytest.mark.parametrize("mode", ["auto", "bar"])
def test_the_bar_is_drawn_on_any_terminal_and_the_rank_log_keeps_the_step_lines(
    tmp_path: Path, mode: str, size: tuple[int, int] | None
) -> None:
    out, log = _progress_in_pty(tmp_path, mode, size)
    assert "epoch 1/1:" in out and "0/4" in out, f"no progress bar on the terminal:\n{out!r}"
    assert "step 1  train/loss_running=1" not in out, "the bar replaces the step lines on the console"
    assert [f"step {n}  train/loss_running=" in log for n in range(1, 5)] == [True] * 4, log


@pytest.mark.parametrize(("mode", "on_console"), [("lines", True), ("off", False)])
def test_lines_and_off_decide_the_console_only(tmp_path: Path, mode: str, on_console: bool) -> None:
    out, log = _progress_in_pty(tmp_path, mode, None)
    assert "epoch 1/1:" not in out
    assert ("step 4  train/loss_running=0.25" in out) is on_console, out
    assert "step 4  train/loss_running=0.25" in log


def test_a_launch_on_an_unsized_pty_draws_the_bar(tmp_path: Path) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=200)  # 5 steps per epoch on 2 ranks
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        model={"name": "tests.helpers.models:SlowMLP", "num_classes": 3, "in_features": IN_FEATURES, "delay": 0.05},
        train={"epochs": 1, "log_every": 2, "precision": "fp32"},
    )
    code, out = run_in_pty([*DTRAIN, "launch", "--gpus", "cpu", "--nproc", "2", str(cfg)], cwd=tmp_path)
    assert code == 0, out
    assert re.search(r"epoch 1/1: +\d+%\|", out), f"no progress bar between the start and the epoch line:\n{out!r}"
    log = (only_run_dir(tmp_path / "runs") / "logs" / "rank0.log").read_text()
    assert "step 2  train/loss_running=" in log and "step 4  train/loss_running=" in log, log


# ----------------------------------------------------------------------------------- Ctrl-C


def _wait_for_step(runs: Path, step: int, proc: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        for metrics in runs.glob("*/*/metrics.jsonl"):
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)
    raise AssertionError(f"training did not reach step {step}")


def test_ctrl_c_shows_one_line_per_stage_in_dtrains_words(tmp_path: Path) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=200)
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        model={"name": "tests.helpers.models:SlowMLP", "num_classes": 3, "in_features": IN_FEATURES, "delay": 0.2},
        train={"epochs": 3, "log_every": 1, "precision": "fp32"},
    )
    # A session of its own, so that the SIGINT below reaches the launcher's whole process group,
    # exactly as a terminal delivers Ctrl-C to the foreground job.
    launcher = subprocess.Popen(
        [*DTRAIN, "launch", "--gpus", "cpu", "--nproc", "2", str(cfg)],
        cwd=tmp_path,
        env=env_for_tests(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    _wait_for_step(tmp_path / "runs", 2, launcher)
    os.killpg(launcher.pid, signal.SIGINT)
    out, _ = launcher.communicate(timeout=180)
    assert launcher.returncode == 75, out

    lines = out.splitlines()
    requested = [i for i, line in enumerate(lines) if line.startswith("dtrain: stop requested (Ctrl-C): ")]
    written = [i for i, line in enumerate(lines) if line.startswith("checkpoint (preempt) -> ")]
    stopped = [i for i, line in enumerate(lines) if line.startswith("dtrain: stopped at step ")]
    assert len(requested) == len(written) == len(stopped) == 1, out
    assert requested[0] < written[0] < stopped[0] == len(lines) - 1, out
    run_dir = only_run_dir(tmp_path / "runs")
    step = (run_dir / "preempted").read_text().split()[1]
    assert lines[stopped[0]] == (
        f"dtrain: stopped at step {step} with the checkpoint written; run the same command again to resume "
        f"(run directory {run_dir})."
    )
    assert f"s{int(step):08d}.pt" in lines[written[0]]
    for foreign in ("SIGTERM", "death signal", "closing signal", "received SIG"):
        assert foreign not in out, f"{foreign!r} on the console:\n{out}"
    assert not TORCH_LOG_LINE.search(out), out
    # Nothing is lost: torchrun's messages and the worker's own are in the run's files.
    assert "death signal" in (run_dir / "launcher" / "torchrun.log").read_text()
    # The rank log names the signal the user sent, not the SIGTERM the launcher forwarded (issue 20).
    assert "received SIGINT (Ctrl-C)" in (run_dir / "logs" / "rank0.log").read_text()


def test_torchrun_messages_go_to_the_log_file_unless_verbose() -> None:
    from launcher import plan as plans

    run = Path("/runs/r")
    quiet = plans.torchrun_plan(
        run / "config.toml", run, plans.Topology(nproc_per_node=2), resume="auto", job_id="j", cuda_visible_devices=""
    )
    loud = plans.torchrun_plan(
        run / "config.toml",
        run,
        plans.Topology(nproc_per_node=2),
        resume="auto",
        job_id="j",
        cuda_visible_devices="",
        verbose=True,
    )
    head = list(quiet.argv[: quiet.argv.index("--")])
    assert head[-2:] == ["--log", str(run / "launcher" / "torchrun.log")]
    assert "--log" not in loud.argv[: loud.argv.index("--")]
    assert loud.argv[-1] == "--verbose" and quiet.argv[-1] == str(run / "config.toml")
    assert quiet.env_dict()["DTRAIN_LAUNCHER_REPORTS_ERRORS"] == "1"
