"""The rendered batch script: golden file, option mapping, validation, quoting, and its logic run by real bash.

The bash runs use stand-ins for srun/scontrol/dtrain on PATH (no SLURM needed); the same script on
a real SLURM cluster is tested in tests/test_slurm_cluster.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dist_train.config import Config, RunConfig, SlurmConfig, load_config
from dist_train.errors import ConfigError, LaunchError
from launcher.cli import cli
from launcher.slurm import (
    JOB_RECORD,
    PACKAGED_TEMPLATE,
    SbatchOptions,
    job_status,
    render_script,
    submit,
    time_limit_seconds,
)

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "dtrain_2nodes_4gpus.sbatch"
FIXED_COMMAND = ["/opt/venv/bin/python", "-m", "launcher.cli"]
FIXED_RUN_DIR = Path("/scratch/runs/wch5/20250101-120000")


def _golden_options() -> SbatchOptions:
    return SbatchOptions(
        nodes=2,
        gpus_per_node=4,
        cpus_per_task=32,
        mem="256G",
        time="1-00:00:00",
        partition="gpu",
        account="physics",
        qos="normal",
        constraint="a100",
        signal_grace=300,
        max_requeues=5,
        sbatch_args=("--exclusive", "--mail-type=FAIL"),
    )


def _directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


# ----------------------------------------------------------------------------- template and golden file


def test_rendered_script_matches_the_golden_file() -> None:
    script = render_script(_golden_options(), FIXED_RUN_DIR, job_name="wch5", dtrain_command=FIXED_COMMAND)
    if os.environ.get("DTRAIN_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text(), "rendered script changed; review, then DTRAIN_UPDATE_GOLDEN=1 to accept"


def test_packaged_template_is_the_slurm_directory_file() -> None:
    # launcher/templates/dtrain.sbatch is a symlink to slurm/dtrain.sbatch: one source of truth.
    assert PACKAGED_TEMPLATE.read_bytes() == (REPO / "slurm" / "dtrain.sbatch").read_bytes()


def test_rendered_script_is_valid_bash() -> None:
    script = render_script(_golden_options(), FIXED_RUN_DIR, job_name="wch5", dtrain_command=FIXED_COMMAND)
    done = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "{{" not in script.replace("{{...}}", "")


def test_fixed_directives_are_always_there() -> None:
    directives = _directives(render_script(SbatchOptions(), FIXED_RUN_DIR, job_name="r", dtrain_command=FIXED_COMMAND))
    for expected in (
        "--requeue",
        "--open-mode=append",
        "--signal=B:USR1@120",
        "--ntasks-per-node=1",
        "--nodes=1",
        "--job-name=r",
        f"--output={FIXED_RUN_DIR}/slurm-%j.out",
        f"--error={FIXED_RUN_DIR}/slurm-%j.err",
    ):
        assert expected in directives
    assert not any(d.startswith(("--gpus", "--mem", "--time", "--partition")) for d in directives)


def test_default_command_is_this_interpreter() -> None:
    script = render_script(SbatchOptions(), FIXED_RUN_DIR, job_name="r")
    assert f"DTRAIN=({sys.executable} -m launcher.cli)" in script


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("field", "value", "directive"),
    [
        ("nodes", 3, "--nodes=3"),
        ("gpus_per_node", 8, "--gpus-per-node=8"),
        ("cpus_per_task", 16, "--cpus-per-task=16"),
        ("mem", "64G", "--mem=64G"),
        ("time", "04:00:00", "--time=04:00:00"),
        ("partition", "gpu-long", "--partition=gpu-long"),
        ("account", "proj_42", "--account=proj_42"),
        ("qos", "high", "--qos=high"),
        ("constraint", "a100|h100", "--constraint=a100|h100"),
        ("job_name", "my run", '--job-name="my run"'),
        ("signal_grace", 600, "--signal=B:USR1@600"),
        ("sbatch_args", ("--exclusive",), "--exclusive"),
    ],
)
def test_each_option_becomes_its_sbatch_line(field: str, value: object, directive: str) -> None:
    opts = SbatchOptions(**{field: value})  # type: ignore[arg-type]
    assert directive in _directives(render_script(opts, FIXED_RUN_DIR, job_name="r", dtrain_command=FIXED_COMMAND))


@pytest.mark.parametrize(
    ("opts", "launch_args"),
    [
        (SbatchOptions(), "LAUNCH_ARGS=(--gpus cpu --nproc 1)"),
        (SbatchOptions(nproc_per_node=3), "LAUNCH_ARGS=(--gpus cpu --nproc 3)"),
        (SbatchOptions(gpus_per_node=4), "LAUNCH_ARGS=(--nproc 4)"),
        (SbatchOptions(gpus_per_node=4, nproc_per_node=2), "LAUNCH_ARGS=(--nproc 2)"),
    ],
)
def test_workers_per_node(opts: SbatchOptions, launch_args: str) -> None:
    assert launch_args in render_script(opts, FIXED_RUN_DIR, job_name="r", dtrain_command=FIXED_COMMAND)


def test_slurm_section_gives_defaults_and_cli_values_win() -> None:
    section = SlurmConfig(nodes=4, gpus_per_node=2, time="02:00:00", partition="p1", sbatch_args=["--exclusive"])
    opts = SbatchOptions.from_config(section, nodes=None, partition="p2", time=None, sbatch_args=["--mail-type=END"])
    assert (opts.nodes, opts.gpus_per_node, opts.time, opts.partition) == (4, 2, "02:00:00", "p2")
    assert list(opts.sbatch_args) == ["--exclusive", "--mail-type=END"]


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (SbatchOptions(job_name="a\nb"), "job_name"),
        (SbatchOptions(job_name='say "hi"'), "quote"),
        (SbatchOptions(constraint="a100\r"), "constraint"),
        (SbatchOptions(partition="gpu;rm"), "partition"),
        (SbatchOptions(account="a b"), "account"),
        (SbatchOptions(mem="lots"), "mem"),
        (SbatchOptions(time="soon"), "time"),
        (SbatchOptions(time="2", signal_grace=120), "signal_grace"),
        (SbatchOptions(nodes=0), "nodes"),
        (SbatchOptions(gpus_per_node=-1), "gpus_per_node"),
        (SbatchOptions(sbatch_args=("exclusive",)), "sbatch option"),
        (SbatchOptions(sbatch_args=("--comment=a\n#SBATCH --x",)), "sbatch_args"),
        (SbatchOptions(sbatch_args=("--comment=a b",)), "blank"),
    ],
)
def test_bad_values_are_config_errors(opts: SbatchOptions, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        render_script(opts, FIXED_RUN_DIR, job_name="r", dtrain_command=FIXED_COMMAND)


@pytest.mark.parametrize("bad", ["/tmp/a\nb", "/tmp/a'; touch PWNED; '", '/tmp/"x"', "/tmp/a\\b"])
def test_run_dir_with_a_newline_or_quote_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="run directory"):
        render_script(SbatchOptions(), Path(bad), job_name="r", dtrain_command=FIXED_COMMAND)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 5400), ("10:30", 630), ("01:02:03", 3723), ("2-03", 183600), ("1-00:30", 88200), ("1-00:00:05", 86405)],
)
def test_time_limit_formats(text: str, seconds: int) -> None:
    assert time_limit_seconds(text) == seconds


# ----------------------------------------------------------------------------- the script run by bash


def _stand_ins(tmp_path: Path) -> Path:
    """srun that runs its command in place (so $srun_pid is the command), scontrol that logs its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho "$*" >> "$FAKE_OUT/scontrol.log"\n')
    (bin_dir / "fake-dtrain").write_text(
        "#!/bin/bash\n"
        'python3 -c \'import json,sys,os; json.dump(sys.argv[1:], open(os.environ["FAKE_OUT"]+"/argv.json","w"))\' "$@"\n'
        'trap \'echo usr1 >> "$FAKE_OUT/signals.log"; exit "${FAKE_SIG_EXIT:-75}"\' USR1\n'
        'touch "$FAKE_OUT/started"\n'
        'if [ "$FAKE_WAIT" = 1 ]; then for _ in $(seq 600); do sleep 0.05; done; fi\n'
        'exit "$FAKE_EXIT"\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def _run_script(
    tmp_path: Path,
    script: str,
    *,
    exit_code: int = 0,
    restart: int = 0,
    wait: bool = False,
    signal_after_start: signal.Signals | None = None,
    signal_exit: int = 75,
) -> tuple[int, Path]:
    bin_dir = _stand_ins(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_OUT": str(out),
        "FAKE_EXIT": str(exit_code),
        "FAKE_WAIT": "1" if wait else "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "n1",
        "SLURM_RESTART_COUNT": str(restart),
        "FAKE_SIG_EXIT": str(signal_exit),
    }
    proc = subprocess.Popen(
        ["bash", str(path)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    if signal_after_start is not None:
        deadline = time.monotonic() + 30
        while not (out / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal_after_start)
    stdout, _ = proc.communicate(timeout=60)
    (out / "stdout.txt").write_bytes(stdout)
    return proc.returncode, out


def _script(tmp_path: Path, run_dir: Path, **opts: object) -> str:
    return render_script(
        SbatchOptions(**opts), run_dir, job_name="r", dtrain_command=[str(tmp_path / "bin" / "fake-dtrain")]
    )  # type: ignore[arg-type]


def test_finished_training_exits_zero_without_requeue(tmp_path: Path) -> None:
    rc, out = _run_script(tmp_path, _script(tmp_path, tmp_path / "run", nproc_per_node=2), exit_code=0)
    assert rc == 0
    assert json.loads((out / "argv.json").read_text()) == [
        "launch",
        f"{tmp_path}/run/config.toml",
        "--run-dir",
        f"{tmp_path}/run",
        "--gpus",
        "cpu",
        "--nproc",
        "2",
    ]
    assert not (out / "scontrol.log").exists()


def test_preempted_training_requeues_the_job(tmp_path: Path) -> None:
    rc, out = _run_script(tmp_path, _script(tmp_path, tmp_path / "run"), exit_code=75, restart=2)
    assert rc == 75
    assert (out / "scontrol.log").read_text().split("\n")[0] == "requeue 4242"


def test_no_requeue_once_max_requeues_is_reached(tmp_path: Path) -> None:
    rc, out = _run_script(tmp_path, _script(tmp_path, tmp_path / "run", max_requeues=2), exit_code=75, restart=2)
    assert rc == 75
    assert not (out / "scontrol.log").exists()
    assert "requeues are used up" in (out / "stdout.txt").read_text()


def test_a_failure_is_passed_through_without_requeue(tmp_path: Path) -> None:
    rc, out = _run_script(tmp_path, _script(tmp_path, tmp_path / "run"), exit_code=3)
    assert rc == 3 and not (out / "scontrol.log").exists()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_to_the_batch_shell_is_forwarded_and_the_job_requeued(tmp_path: Path, sig: signal.Signals) -> None:
    rc, out = _run_script(tmp_path, _script(tmp_path, tmp_path / "run"), wait=True, signal_after_start=sig)
    if sig == signal.SIGUSR1:
        assert (out / "signals.log").read_text() == "usr1\n"  # the stand-in checkpointed and exited 75
        assert rc == 75 and (out / "scontrol.log").read_text() == "requeue 4242\n"
    else:  # TERM reaches the step too (a plain process dies of it: exit 143, no requeue)
        assert rc == 143 and not (out / "scontrol.log").exists()
    assert f"got SIG{sig.name.removeprefix('SIG')}" in (out / "stdout.txt").read_text()


def test_stopped_before_a_checkpoint_after_a_signal_still_requeues(tmp_path: Path) -> None:
    # dtrain launch exits 130 when told to stop before the workers could checkpoint (e.g. during start-up).
    rc, out = _run_script(
        tmp_path, _script(tmp_path, tmp_path / "run"), wait=True, signal_after_start=signal.SIGUSR1, signal_exit=130
    )
    assert rc == 130 and (out / "scontrol.log").read_text() == "requeue 4242\n"


def test_exit_130_without_a_signal_is_not_requeued(tmp_path: Path) -> None:
    rc, out = _run_script(tmp_path, _script(tmp_path, tmp_path / "run"), exit_code=130)
    assert rc == 130 and not (out / "scontrol.log").exists()


HOSTILE = ["$(touch PWNED)", "`touch PWNED`", "; touch PWNED;", "a&&touch PWNED|", "50% {{RUN_DIR}} $HOME *"]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_run_dir_reaches_dtrain_verbatim_and_runs_nothing(tmp_path: Path, hostile: str) -> None:
    run_dir = tmp_path / f"run {hostile}"
    script = render_script(
        SbatchOptions(), run_dir, job_name="r", dtrain_command=[str(tmp_path / "bin" / "fake-dtrain")]
    )
    rc, out = _run_script(tmp_path, script)
    assert rc == 0
    argv = json.loads((out / "argv.json").read_text())
    assert argv[1:4] == [f"{run_dir}/config.toml", "--run-dir", str(run_dir)]
    assert not list(tmp_path.rglob("PWNED")) and not (REPO / "PWNED").exists()


@pytest.mark.parametrize("hostile", ["$(touch PWNED)", "`touch PWNED`", "x;touch PWNED", "{{RUN_DIR}}"])
def test_hostile_job_name_stays_on_its_sbatch_line(tmp_path: Path, hostile: str) -> None:
    script = render_script(SbatchOptions(job_name=hostile), FIXED_RUN_DIR, job_name="r", dtrain_command=FIXED_COMMAND)
    value = f'"{hostile}"' if " " in hostile else hostile  # sbatch's own quoting for blanks
    assert f"#SBATCH --job-name={value}" in script.splitlines()
    assert script.count(hostile) == 1  # not expanded into the shell part, nor substituted again


# ----------------------------------------------------------------------------- submit, status, CLI


def _fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stdout: str = "777;cluster", rc: int = 0) -> Path:
    bin_dir = tmp_path / "sbatch-bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch-argv.json"
    (bin_dir / "sbatch").write_text(
        f'#!/bin/bash\npython3 -c \'import json,sys; json.dump(sys.argv[1:], open("{log}","w"))\' "$@"\n'
        f"echo '{stdout}'\nexit {rc}\n"
    )
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def _cfg_file(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(
        f'[run]\nname = "demo"\noutput_dir = "{tmp_path / "runs"}"\n[data]\npath = "rel/data.h5"\n'
        '[slurm]\nnodes = 2\ngpus_per_node = 4\ntime = "04:00:00"\n'
    )
    return path


def test_submit_writes_the_run_dir_and_calls_sbatch_with_an_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv_log = _fake_sbatch(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_cfg_file(tmp_path))
    run_dir = tmp_path / "runs" / "demo" / "fixed"
    sub = submit(cfg, SbatchOptions.from_config(cfg.slurm), run_dir)
    assert sub.job_id == "777"
    assert json.loads(argv_log.read_text()) == ["--parsable", str(run_dir / "dtrain.sbatch")]
    saved = load_config(run_dir / "config.toml")
    assert saved.data.path == str(tmp_path / "rel" / "data.h5")  # absolute: the job may start elsewhere
    assert saved.slurm.nodes == 2
    assert json.loads((run_dir / JOB_RECORD).read_text())["job_id"] == "777"
    assert "#SBATCH --gpus-per-node=4" in (run_dir / "dtrain.sbatch").read_text()


def test_sbatch_refusal_is_a_launch_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_sbatch(tmp_path, monkeypatch, stdout="sbatch: error: Invalid account", rc=1)
    cfg = Config(run=RunConfig(name="x", output_dir=str(tmp_path)))
    with pytest.raises(LaunchError, match="sbatch refused"):
        submit(cfg, SbatchOptions(), tmp_path / "run")


def test_status_of_a_job_slurm_no_longer_knows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the job is gone as far as we can tell
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("epoch-0003.pt\n")
    (run_dir / JOB_RECORD).write_text('{"job_id": "99"}')
    (run_dir / "metrics.jsonl").write_text('{"epoch": 2, "val/loss": 0.5}\n{"epoch": 3, "val/loss": 0.4}\n{"trunc')
    status = job_status(run_dir)
    assert (status.job_id, status.restart_count) == ("99", None)
    assert status.state.startswith("finished/unknown")
    assert status.latest_checkpoint == "epoch-0003.pt"
    assert status.last_metrics == {"epoch": 3, "val/loss": 0.4}
    result = CliRunner().invoke(cli, ["slurm", "status", str(run_dir)])
    assert result.exit_code == 0 and "job id:            99" in result.output and "epoch-0003.pt" in result.output


def test_cli_script_prints_the_script_with_cli_options(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "slurm",
            "script",
            str(_cfg_file(tmp_path)),
            "--nodes",
            "3",
            "--partition",
            "gpu",
            "--run-dir",
            str(tmp_path / "r"),
            "--sbatch-arg=--exclusive",
            "--set",
            "run.name=other",
        ],
    )
    assert result.exit_code == 0, result.output
    directives = _directives(result.output)
    assert {
        "--nodes=3",
        "--gpus-per-node=4",
        "--time=04:00:00",
        "--partition=gpu",
        "--exclusive",
        "--job-name=other",
    } <= set(directives)
    assert not (tmp_path / "r").exists()  # `script` creates nothing


def test_every_cli_resource_option_overrides_its_sbatch_field(tmp_path: Path) -> None:
    """The commands hand their options to SbatchOptions by name: each must name a field, and win over [slurm]."""
    argv = (
        "--nodes=2 --gpus-per-node=8 --nproc-per-node=2 --cpus-per-task=6 --mem=32G --time=1-00:00:00 "
        "--partition=big --account=acct --qos=high --constraint=h100 --job-name=named --signal-grace=77 --max-requeues=5"
    ).split()
    fields = {arg[2:].split("=")[0].replace("-", "_") for arg in argv}
    taken_by_name = {"config", "run_dir", "overrides", "sbatch_args", "help"}
    script_params = [p.name for p in cli.commands["slurm"].commands["script"].params]  # type: ignore[attr-defined]
    assert {name for name in script_params if name not in taken_by_name} == fields

    result = CliRunner().invoke(cli, ["slurm", "script", str(_cfg_file(tmp_path)), "--run-dir", str(tmp_path), *argv])
    assert result.exit_code == 0, result.output
    directives = set(_directives(result.output))
    not_directives = ("--nproc-per-node", "--signal-grace", "--max-requeues")
    assert {arg for arg in argv if not arg.startswith(not_directives)} <= directives  # the same #SBATCH option
    assert "--signal=B:USR1@77" in directives
    assert "LAUNCH_ARGS=(--nproc 2)" in result.output and "MAX_REQUEUES=5" in result.output


def test_cli_submit_reports_job_and_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_sbatch(tmp_path, monkeypatch, stdout="31337")
    result = CliRunner().invoke(cli, ["slurm", "submit", str(_cfg_file(tmp_path)), "--gpus-per-node", "0"])
    assert result.exit_code == 0, result.output
    assert "Submitted SLURM job 31337" in result.output
    run_dirs = list((tmp_path / "runs" / "demo").iterdir())
    assert len(run_dirs) == 1 and str(run_dirs[0] / "slurm-31337.out") in result.output
