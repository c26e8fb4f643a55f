"""The batch script on a real two-node SLURM cluster (tests/slurm_cluster.py): signals, requeue, time limits.

Two kinds of job run here:
- the rendered dtrain.sbatch with a stand-in for `dtrain` (a bash script that logs each start and
  exits 75 on USR1, as a checkpointing `dtrain launch` does): checks the script's own logic
  (trap, forwarding through srun to every node, requeue, restart limit, quoting) on real SLURM;
- the real `dtrain launch` training a tiny config: checks the whole path end to end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dist_train.config import Config, RunConfig, load_config
from launcher.slurm import SbatchOptions, Submission, job_status, submit

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import SlurmCluster, SlurmUnavailable, missing_requirements  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

FAKE_DTRAIN = r"""#!/bin/bash
# Stands in for `dtrain`: logs every start and signal in the run dir; exits 75 on USR1 like a
# `dtrain launch` whose workers wrote a preemption checkpoint.
set -u
[ "$1" = launch ] || exit 64
all_args="$*"
config="$2"
run_dir=""
while [ $# -gt 0 ]; do
    if [ "$1" = --run-dir ]; then run_dir=$2; fi
    shift
done
log="$run_dir/fake.log"
node=${SLURM_NODEID:-?}
restart=${SLURM_RESTART_COUNT:-0}
echo "start node=$node restart=$restart step=${SLURM_STEP_ID:-none} config_exists=$([ -f "$config" ] && echo yes || echo no) args=$all_args" >> "$log"
trap 'echo "usr1 node=$node restart=$restart" >> "$log"; exit 75' USR1
if [ -e "$run_dir/finish_on_restart" ] && [ "$restart" -ge 1 ]; then
    echo "done node=$node restart=$restart" >> "$log"
    exit 0
fi
for _ in $(seq 3000); do
    if [ -e "$run_dir/finish" ]; then
        echo "done node=$node restart=$restart" >> "$log"
        exit 0
    fi
    sleep 0.1
done
exit 1
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    try:
        started = SlurmCluster.start()
    except SlurmUnavailable as exc:  # pragma: no cover - raced with missing_requirements
        pytest.skip(str(exc))
    saved = os.environ.get("SLURM_CONF")
    # submit() runs sbatch from this process: point the client tools at the test cluster.
    os.environ["SLURM_CONF"] = str(started.conf)
    try:
        yield started
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        started.cleanup()


@pytest.fixture
def jobs(cluster: SlurmCluster) -> Iterator[list[str]]:
    """Job ids a test submitted; cancelled afterwards even if the test failed."""
    submitted: list[str] = []
    yield submitted
    for job_id in submitted:
        cluster.run("scancel", job_id, check=False)
    for job_id in submitted:
        try:
            cluster.wait_done(job_id, 30)
        except TimeoutError:
            pass


@pytest.fixture
def fake_dtrain(tmp_path: Path) -> list[str]:
    path = tmp_path / "fake-dtrain"
    path.write_text(FAKE_DTRAIN)
    path.chmod(0o755)
    return [str(path)]


def _cfg(tmp_path: Path, name: str = "slurmtest") -> Config:
    return Config(run=RunConfig(name=name, output_dir=str(tmp_path / "runs")))


def _submit(cfg: Config, opts: SbatchOptions, run_dir: Path, jobs: list[str], command: list[str] | None) -> Submission:
    sub = submit(cfg, opts, run_dir, dtrain_command=command)
    jobs.append(sub.job_id)
    return sub


def _log_lines(run_dir: Path) -> list[str]:
    log = run_dir / "fake.log"
    return log.read_text().splitlines() if log.exists() else []


def _wait_for(predicate, what: str, timeout: float, cluster: SlurmCluster, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(run_dir.glob("*")) if p.is_file())
    raise AssertionError(f"timed out waiting for {what}\n{logs}\n{cluster.logs()}")


def _starts(run_dir: Path, restart: int) -> int:
    return sum(1 for line in _log_lines(run_dir) if line.startswith("start ") and f" restart={restart} " in line)


# ----------------------------------------------------------------------------- the cluster itself


def test_cluster_runs_one_task_on_each_node(cluster: SlurmCluster, tmp_path: Path, jobs: list[str]) -> None:
    script = tmp_path / "hello.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n"
        f"#SBATCH --output={tmp_path}/hello-%j.out\n"
        "srun bash -c 'echo node=$SLURMD_NODENAME step=$SLURM_STEP_ID'\n"
    )
    job_id = cluster.run("sbatch", "--parsable", str(script)).stdout.strip()
    jobs.append(job_id)
    assert cluster.wait_done(job_id, 60) == "COMPLETED"
    out = (tmp_path / f"hello-{job_id}.out").read_text()
    assert sorted(re.findall(r"node=(\S+) step=0", out)) == ["127.0.0.1", "127.0.0.2"]


# ----------------------------------------------------------------------------- the batch script's logic


def test_usr1_reaches_every_node_and_the_job_requeues_then_completes(
    cluster: SlurmCluster, tmp_path: Path, jobs: list[str], fake_dtrain: list[str]
) -> None:
    run_dir = tmp_path / "run"
    opts = SbatchOptions(nodes=2, nproc_per_node=2, max_requeues=3)
    sub = _submit(_cfg(tmp_path), opts, run_dir, jobs, fake_dtrain)
    _wait_for(lambda: _starts(run_dir, 0) == 2, "both nodes to start", 60, cluster, run_dir)
    first = [line for line in _log_lines(run_dir) if line.startswith("start ")]
    assert all("config_exists=yes" in line and "--gpus cpu --nproc 2" in line for line in first), first
    assert all("step=0" in line for line in first), first

    cluster.run("scancel", "-s", "USR1", "-b", sub.job_id)
    _wait_for(lambda: _starts(run_dir, 1) == 2, "both nodes to start again after the requeue", 90, cluster, run_dir)
    lines = _log_lines(run_dir)
    assert sorted(line for line in lines if line.startswith("usr1")) == [
        "usr1 node=0 restart=0",
        "usr1 node=1 restart=0",
    ]

    (run_dir / "finish").touch()
    assert cluster.wait_done(sub.job_id, 60) == "COMPLETED"
    assert cluster.job_field(sub.job_id, "Restarts") == "1"
    out = sub.stdout_log.read_text()
    assert "requeueing job" in out and "attempt 2" in out, out  # --open-mode=append kept attempt 1's lines
    status = job_status(run_dir)
    assert status.job_id == sub.job_id and status.state == "COMPLETED" and status.restart_count == 1


def test_a_finished_job_is_not_requeued(
    cluster: SlurmCluster, tmp_path: Path, jobs: list[str], fake_dtrain: list[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "finish").touch()
    sub = _submit(_cfg(tmp_path), SbatchOptions(nodes=2), run_dir, jobs, fake_dtrain)
    assert cluster.wait_done(sub.job_id, 60) == "COMPLETED"
    assert cluster.job_field(sub.job_id, "Restarts") == "0"
    assert "requeueing" not in sub.stdout_log.read_text()


def test_requeues_stop_at_max_requeues(
    cluster: SlurmCluster, tmp_path: Path, jobs: list[str], fake_dtrain: list[str]
) -> None:
    run_dir = tmp_path / "run"
    sub = _submit(_cfg(tmp_path), SbatchOptions(nodes=1, max_requeues=0), run_dir, jobs, fake_dtrain)
    _wait_for(lambda: _starts(run_dir, 0) == 1, "the node to start", 60, cluster, run_dir)
    cluster.run("scancel", "-s", "USR1", "-b", sub.job_id)
    state = cluster.wait_done(sub.job_id, 60)
    assert state == "FAILED"  # exit 75, not requeued
    assert cluster.job_field(sub.job_id, "ExitCode") == "75:0"
    assert "requeues are used up" in sub.stdout_log.read_text()


def test_hostile_names_and_paths_run_without_injection(
    cluster: SlurmCluster, tmp_path: Path, jobs: list[str], fake_dtrain: list[str]
) -> None:
    marker = f"pwned-{os.getpid()}"  # a relative name: a path's '/' could not be part of a directory name
    run_dir = tmp_path / f"run $(touch {marker}); `touch {marker}` & 100% {{{{JOB_NAME}}}}"
    run_dir.mkdir()
    (run_dir / "finish").touch()
    opts = SbatchOptions(nodes=1, job_name=f"x;$(touch {marker})`touch {marker}`")
    sub = _submit(_cfg(tmp_path), opts, run_dir, jobs, fake_dtrain)
    assert cluster.wait_done(sub.job_id, 60) == "COMPLETED"
    # sbatch runs the job in the directory it was called from: the run dir; the test runs elsewhere.
    assert not list(tmp_path.rglob(f"{marker}*")) and not (Path.cwd() / marker).exists()
    assert cluster.job_field(sub.job_id, "JobName") == "x;$(touch"  # scontrol -o splits on blanks
    assert (run_dir / f"slurm-{sub.job_id}.out").is_file()
    assert _log_lines(run_dir)[0].startswith("start node=0")


def test_time_limit_warning_requeues_and_the_job_finishes(
    cluster: SlurmCluster, tmp_path: Path, jobs: list[str], fake_dtrain: list[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "finish_on_restart").touch()
    opts = SbatchOptions(nodes=2, time="1", signal_grace=30)
    sub = _submit(_cfg(tmp_path), opts, run_dir, jobs, fake_dtrain)
    # The warning arrives 30..60 s before the 60 s limit, i.e. 0..30 s after the start.
    assert cluster.wait_done(sub.job_id, 150) == "COMPLETED"
    lines = _log_lines(run_dir)
    assert sorted(line for line in lines if line.startswith("usr1")) == [
        "usr1 node=0 restart=0",
        "usr1 node=1 restart=0",
    ]
    assert sorted(line for line in lines if line.startswith("done")) == [
        "done node=0 restart=1",
        "done node=1 restart=1",
    ]


# ----------------------------------------------------------------------------- real training (needs `dtrain launch`)


def _dtrain_launch_ready() -> str | None:
    done = subprocess.run([sys.executable, "-m", "launcher.cli", "launch", "--help"], capture_output=True, text=True)
    if done.returncode != 0 or "--run-dir" not in done.stdout:
        return "`dtrain launch --run-dir` is not implemented yet"
    return None


def _training_config(tmp_path: Path, epochs: int = 3, events: int = 1200) -> Path:
    """A tiny wch5 config (4 CPU workers in all) and its data, written by `dtrain data synth` up front:
    with `synth_if_missing` every node would write the same file at once."""
    data = tmp_path / "tiny.h5"
    if not data.exists():
        done = subprocess.run(
            [sys.executable, "-m", "launcher.cli", "data", "synth", str(data), "-n", str(events), "--seed", "3"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    path = tmp_path / "tiny.toml"
    path.write_text(f"""
[run]
name = "slurmtiny"
output_dir = "{tmp_path / "runs"}"
seed = 3
deterministic = true
[data]
path = "{data}"
batch_size = 16
num_workers = 0
pin_memory = false
persistent_workers = false
[model]
name = "simple_mlp"
num_classes = 3
[train]
epochs = {epochs}
precision = "fp32"
progress = "off"
log_every = 5
[log]
tensorboard = false
""")
    return path


def _final_metrics(run_dir: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    vals = [r for r in records if any(k.startswith("val/") for k in r)]
    assert vals, records
    return {k: v for k, v in vals[-1].items() if k.startswith("val/")}


def _reference_metrics(config: Path, tmp_path: Path) -> dict[str, float]:
    ref_dir = tmp_path / "reference"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "launch",
            str(config),
            "--gpus",
            "cpu",
            "--nproc",
            "4",
            "--run-dir",
            str(ref_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return _final_metrics(ref_dir)


@pytest.fixture
def launch_ready() -> None:
    reason = _dtrain_launch_ready()
    if reason:
        pytest.skip(reason)


def test_two_nodes_train_like_one_node_with_four_workers(
    cluster: SlurmCluster, tmp_path: Path, jobs: list[str], launch_ready: None
) -> None:
    config = _training_config(tmp_path)
    reference = _reference_metrics(config, tmp_path)
    run_dir = tmp_path / "slurm-run"
    sub = _submit(load_config(config), SbatchOptions(nodes=2, nproc_per_node=2, cpus_per_task=2), run_dir, jobs, None)
    assert cluster.wait_done(sub.job_id, 600) == "COMPLETED", sub.stdout_log.read_text() + sub.stderr_log.read_text()
    assert _final_metrics(run_dir) == reference  # exactly: same world size, threads and device (issue 12)


def _metric_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _preempt_after_progress(cluster: SlurmCluster, sub: Submission, attempt: int) -> None:
    """Once this attempt has logged two new metric lines (mid-epoch), send the time-limit warning:
    USR1 to the batch shell, as `--signal=B:USR1@N` would."""
    _wait_for(
        lambda: (
            cluster.job_state(sub.job_id) == "RUNNING" and cluster.job_field(sub.job_id, "Restarts") == str(attempt)
        ),
        f"attempt {attempt + 1} to run",
        120,
        cluster,
        sub.run_dir,
    )
    baseline = _metric_lines(sub.run_dir)
    _wait_for(
        lambda: _metric_lines(sub.run_dir) >= baseline + 2, "training to make progress", 300, cluster, sub.run_dir
    )
    cluster.run("scancel", "-s", "USR1", "-b", sub.job_id)
    _wait_for(
        lambda: cluster.job_field(sub.job_id, "Restarts") == str(attempt + 1), "the requeue", 120, cluster, sub.run_dir
    )


@pytest.mark.parametrize("preemptions", [1, 2])
def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(
    cluster: SlurmCluster, tmp_path: Path, jobs: list[str], launch_ready: None, preemptions: int
) -> None:
    config = _training_config(tmp_path, epochs=4)
    reference = _reference_metrics(config, tmp_path)
    run_dir = tmp_path / "slurm-run"
    sub = _submit(load_config(config), SbatchOptions(nodes=2, nproc_per_node=2, max_requeues=3), run_dir, jobs, None)
    for attempt in range(preemptions):
        _preempt_after_progress(cluster, sub, attempt)
    assert cluster.wait_done(sub.job_id, 600) == "COMPLETED", sub.stdout_log.read_text() + sub.stderr_log.read_text()
    assert cluster.job_field(sub.job_id, "Restarts") == str(preemptions)
    out = sub.stdout_log.read_text()
    assert out.count("requeueing job") == preemptions, out
    assert _final_metrics(run_dir) == reference  # exactly: same world size, threads and device (issue 12)
    assert job_status(run_dir).latest_checkpoint


SLOW_MODEL = """
import math
import time

from torch import nn


class SlowMLP(nn.Module):
    \"\"\"A small MLP whose training forward sleeps: each step lasts at least `delay` s on any machine.\"\"\"

    def __init__(self, sample_shape, num_classes, delay=0.4):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(sample_shape), 40), nn.ReLU(), nn.Linear(40, num_classes))
        self.delay = delay

    def forward(self, x):
        if self.training:
            time.sleep(self.delay)
        return self.net(x)
"""


@pytest.mark.timeout(1200)
def test_real_time_limit_requeues_and_finishes(
    cluster: SlurmCluster, tmp_path: Path, jobs: list[str], launch_ready: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 2-minute limit with the warning 30 s ahead arrives 60..90 s into each attempt. The training
    # sleeps 0.4 s in each of its 8 x 30 steps, so it needs at least 96 s: more than one attempt,
    # whatever the machine's speed.
    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}")  # sbatch exports it to the job
    config = _training_config(tmp_path, epochs=8, events=1200)
    config.write_text(config.read_text().replace('name = "simple_mlp"', 'name = "slow_model:SlowMLP"\ndelay = 0.4'))
    run_dir = tmp_path / "slurm-run"
    opts = SbatchOptions(nodes=2, nproc_per_node=1, time="2", signal_grace=30, max_requeues=10)
    sub = _submit(load_config(config), opts, run_dir, jobs, None)
    assert cluster.wait_done(sub.job_id, 900) == "COMPLETED", sub.stdout_log.read_text() + sub.stderr_log.read_text()
    out = sub.stdout_log.read_text()
    assert int(cluster.job_field(sub.job_id, "Restarts")) >= 1, out
    assert "got SIGUSR1" in out and "requeueing job" in out and "resumed from" in out, out
    assert (run_dir / "completed").exists()
