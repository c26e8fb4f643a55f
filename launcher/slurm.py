"""Render, submit and inspect dtrain's SLURM batch job (``dtrain slurm script|submit|status``).

The batch script comes from one template, ``slurm/dtrain.sbatch``; the packaged
``launcher/templates/dtrain.sbatch`` is a symlink to it (wheels store the file's content), so users
read and copy the very file the code renders. Rendering is safe substitution: every value that
lands in shell code is ``shlex.quote``-d, every ``#SBATCH`` value is validated (no control
characters, no quotes), so no config value or path can inject shell code or extra directives.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from dist_train.checkpoint.layout import CHECKPOINTS_SUBDIR, LATEST_POINTER
from dist_train.config import Config, SlurmConfig, make_data_paths_absolute, save_config
from dist_train.errors import ConfigError, LaunchError
from dist_train.fsutil import atomic_write_text, make_private_dir

TEMPLATE_NAME = "dtrain.sbatch"
PACKAGED_TEMPLATE = Path(__file__).with_name("templates") / TEMPLATE_NAME
SCRIPT_NAME = "dtrain.sbatch"
JOB_RECORD = "slurm_job.json"
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")
# SLURM time limits: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM_RE = re.compile(r"^\d+[KMGTkmgt]?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.,+-]+$")
_FORBIDDEN_IN_DIRECTIVE = re.compile(r"[\x00-\x1f\x7f\"'\\]")


@dataclass
class SbatchOptions(SlurmConfig):
    """The ``[slurm]`` section after the command line's overrides: everything the batch script depends
    on besides the run directory. Same fields as SlurmConfig (one definition of them)."""

    @classmethod
    def from_config(cls, slurm: SlurmConfig, **overrides: Any) -> SbatchOptions:
        """``[slurm]`` values, replaced by every override that is not None (the CLI's unset options)."""
        base = cls(**{**asdict(slurm), "sbatch_args": list(slurm.sbatch_args)})
        given = {k: v for k, v in overrides.items() if v is not None}
        if "sbatch_args" in given:
            given["sbatch_args"] = list(base.sbatch_args) + list(given["sbatch_args"])
        return replace(base, **given)

    @property
    def workers_per_node(self) -> int:
        if self.nproc_per_node > 0:
            return self.nproc_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1


# ----------------------------------------------------------------------------- validation


def _directive_value(key: str, value: str) -> str:
    """A value for an ``#SBATCH`` line. sbatch (not the shell) reads these lines: it splits on blanks and
    understands double quotes only, so a value with blanks is double-quoted and quotes, backslashes and
    control characters (a newline would start a new script line) are refused."""
    if _FORBIDDEN_IN_DIRECTIVE.search(value):
        raise ConfigError(
            f"slurm.{key} = {value!r} cannot go on an #SBATCH line: it contains a quote, a backslash or a control "
            "character (such as a newline). Use a plain value, for example letters, digits, '-', '_' and '.'."
        )
    return f'"{value}"' if any(ch.isspace() for ch in value) else value


def _check_named(key: str, value: str) -> str:
    if value and not _NAME_RE.match(value):
        raise ConfigError(
            f"slurm.{key} = {value!r} is not a valid SLURM name: use letters, digits, '_', '-', '.', ',' or '+'."
        )
    return value


def time_limit_seconds(text: str) -> int:
    m = _TIME_RE.match(text)
    if not m:
        raise ConfigError(
            f"slurm.time = {text!r} is not a SLURM time limit; use minutes ('90'), 'HH:MM:SS', or 'D-HH:MM:SS'."
        )
    days, a, b, c = m.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # H:M:S
        return int(a) * 3600 + int(b) * 60 + int(c)
    return int(a) * 60 + int(b or 0)  # M or M:S


def validate_options(opts: SbatchOptions) -> None:
    if opts.nodes < 1:
        raise ConfigError(f"slurm.nodes = {opts.nodes!r} must be at least 1.")
    for key in ("gpus_per_node", "nproc_per_node", "cpus_per_task", "max_requeues"):
        if getattr(opts, key) < 0:
            raise ConfigError(f"slurm.{key} = {getattr(opts, key)!r} must be >= 0.")
    if opts.signal_grace < 1:
        raise ConfigError(
            f"slurm.signal_grace = {opts.signal_grace!r} must be at least 1 second: the workers need time to checkpoint."
        )
    if opts.mem and not _MEM_RE.match(opts.mem):
        raise ConfigError(f"slurm.mem = {opts.mem!r} is not a SLURM memory size; use e.g. '32G' or '8000M'.")
    if opts.time:
        limit = time_limit_seconds(opts.time)
        if limit <= opts.signal_grace:
            raise ConfigError(
                f"slurm.time = {opts.time!r} ({limit} s) is not longer than slurm.signal_grace = {opts.signal_grace} s: "
                "the checkpoint warning would come before the job even starts. Raise the time or lower the grace."
            )
    for key in ("partition", "account", "qos"):
        _check_named(key, getattr(opts, key))
    for key in ("constraint", "job_name"):
        _directive_value(key, getattr(opts, key))
    for arg in opts.sbatch_args:
        _directive_value("sbatch_args", arg)
        if any(ch.isspace() for ch in arg):
            raise ConfigError(
                f"slurm.sbatch_args entry {arg!r} contains a blank; pass one option per entry, without blanks."
            )
        if not arg.startswith("-"):
            raise ConfigError(
                f"slurm.sbatch_args entry {arg!r} is not an sbatch option; write each as '--name=value' (e.g. '--exclusive')."
            )


# ----------------------------------------------------------------------------- rendering


def load_template() -> str:
    try:
        return PACKAGED_TEMPLATE.read_text(encoding="utf-8")
    except OSError as exc:  # pragma: no cover - a broken install
        raise LaunchError(
            f"the batch-script template {PACKAGED_TEMPLATE} cannot be read ({exc}); reinstall dtrain."
        ) from None


def default_dtrain_command() -> list[str]:
    """Run dtrain with the interpreter that runs us: the job then uses this very virtual environment."""
    return [sys.executable, "-m", "launcher.cli"]


def _log_path(run_dir: Path, suffix: str) -> str:
    # sbatch expands %-patterns in log names; a literal % in the run dir must be doubled.
    if _FORBIDDEN_IN_DIRECTIVE.search(str(run_dir)):
        raise ConfigError(
            f"run directory {str(run_dir)!r} cannot hold the SLURM logs: sbatch cannot take a path with a quote, a "
            "backslash or a control character (such as a newline). Pick another --run-dir or run.output_dir/run.name."
        )
    escaped = str(run_dir).replace("%", "%%")
    return _directive_value("run_dir", f"{escaped}/slurm-%j.{suffix}")


def sbatch_resource_lines(opts: SbatchOptions) -> list[str]:
    """The optional ``#SBATCH`` lines, in a fixed order."""
    lines: list[str] = []
    if opts.gpus_per_node > 0:
        lines.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.cpus_per_task > 0:
        lines.append(f"--cpus-per-task={opts.cpus_per_task}")
    for key in ("mem", "time", "partition", "account", "qos", "constraint"):
        value = getattr(opts, key)
        if value:
            lines.append(f"--{key}={_directive_value(key, value)}")
    lines.extend(_directive_value("sbatch_args", arg) for arg in opts.sbatch_args)
    return [f"#SBATCH {line}" for line in lines]


def launch_args(opts: SbatchOptions) -> list[str]:
    if opts.gpus_per_node == 0:
        return ["--gpus", "cpu", "--nproc", str(opts.workers_per_node)]
    return ["--nproc", str(opts.workers_per_node)]


def _quote_all(words: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def render_script(opts: SbatchOptions, run_dir: Path, job_name: str, dtrain_command: list[str] | None = None) -> str:
    """The batch script for ``run_dir`` (which will hold config.toml)."""
    validate_options(opts)
    run_dir = Path(run_dir).absolute()
    resources = sbatch_resource_lines(opts)
    values = {
        "JOB_NAME": _directive_value("job_name", opts.job_name or job_name),
        "NODES": str(opts.nodes),
        "SBATCH_RESOURCES": "\n".join(resources) if resources else "# (no further resource requests)",
        "SIGNAL_GRACE": str(opts.signal_grace),
        "LOG_OUT": _log_path(run_dir, "out"),
        "LOG_ERR": _log_path(run_dir, "err"),
        "DTRAIN_COMMAND": _quote_all(dtrain_command or default_dtrain_command()),
        "RUN_DIR": shlex.quote(str(run_dir)),
        "LAUNCH_ARGS": _quote_all(launch_args(opts)),
        "MAX_REQUEUES": str(opts.max_requeues),
    }
    return substitute(load_template(), values)


def substitute(template: str, values: dict[str, str]) -> str:
    """Replace ``{{NAME}}`` once, in one pass: a value containing ``{{...}}`` is never expanded again."""
    missing = sorted(set(_PLACEHOLDER.findall(template)) - set(values))
    if missing:  # pragma: no cover - template and code out of sync
        raise LaunchError(f"batch-script template field(s) without a value: {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


# ----------------------------------------------------------------------------- submit


@dataclass(frozen=True)
class Submission:
    job_id: str
    run_dir: Path
    script: Path
    stdout_log: Path
    stderr_log: Path


def new_run_dir(cfg: Config) -> Path:
    """``<run.output_dir>/<run.name>/<timestamp>`` (the same layout `dtrain launch` uses)."""
    from launcher.run_dirs import new_run_dir as timestamped_run_dir

    return timestamped_run_dir(cfg.run.output_dir, cfg.run.name).absolute()


def prepare_run_dir(cfg: Config, run_dir: Path, script: str) -> Path:
    make_private_dir(run_dir)
    # The job may start in another directory (and on other nodes): store absolute data paths.
    cfg = replace(cfg, data=replace(cfg.data))
    make_data_paths_absolute(cfg)
    save_config(cfg, run_dir / "config.toml")
    path = run_dir / SCRIPT_NAME
    atomic_write_text(path, script)
    os.chmod(path, 0o755)
    return path


def parse_job_id(sbatch_stdout: str) -> str:
    # `sbatch --parsable` prints "JOBID" or "JOBID;CLUSTER".
    text = sbatch_stdout.strip().splitlines()[-1] if sbatch_stdout.strip() else ""
    job_id = text.split(";", 1)[0].strip()
    if not job_id.isdigit():
        raise LaunchError(f"sbatch did not print a job id (got {sbatch_stdout.strip()!r}).")
    return job_id


def submit(cfg: Config, opts: SbatchOptions, run_dir: Path, dtrain_command: list[str] | None = None) -> Submission:
    run_dir = Path(run_dir).absolute()
    script_text = render_script(opts, run_dir, job_name=cfg.run.name, dtrain_command=dtrain_command)
    script = prepare_run_dir(cfg, run_dir, script_text)
    argv = ["sbatch", "--parsable", str(script)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=run_dir, timeout=120)
    except FileNotFoundError:
        raise LaunchError(
            f"`sbatch` is not on PATH: is this a SLURM login node? The script is ready at {script}; "
            "submit it with `sbatch` where SLURM is available."
        ) from None
    if done.returncode != 0:
        raise LaunchError(f"sbatch refused the job (exit {done.returncode}): {done.stderr.strip()} Script: {script}")
    job_id = parse_job_id(done.stdout)
    record = {
        "job_id": job_id,
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "script": str(script),
        "argv": argv,
        "nodes": opts.nodes,
        "workers_per_node": opts.workers_per_node,
    }
    atomic_write_text(run_dir / JOB_RECORD, json.dumps(record, indent=2) + "\n")
    return Submission(job_id, run_dir, script, run_dir / f"slurm-{job_id}.out", run_dir / f"slurm-{job_id}.err")


# ----------------------------------------------------------------------------- status


@dataclass(frozen=True)
class JobStatus:
    run_dir: Path
    job_id: str
    state: str
    restart_count: int | None
    reason: str
    latest_checkpoint: str
    last_metrics: dict[str, Any] | None

    def lines(self) -> list[str]:
        restarts = "unknown" if self.restart_count is None else str(self.restart_count)
        metrics = json.dumps(self.last_metrics, sort_keys=True) if self.last_metrics else "(none yet)"
        state = self.state + (f" ({self.reason})" if self.reason and self.reason != "None" else "")
        return [
            f"run dir:           {self.run_dir}",
            f"job id:            {self.job_id or '(not recorded)'}",
            f"state:             {state}",
            f"restarts:          {restarts}",
            f"latest checkpoint: {self.latest_checkpoint or '(none yet)'}",
            f"last metrics:      {metrics}",
        ]


def _scontrol_job(job_id: str) -> dict[str, str]:
    try:
        done = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    if done.returncode != 0:
        return {}
    fields: dict[str, str] = {}
    for token in done.stdout.split():
        if "=" in token:
            key, value = token.split("=", 1)
            fields.setdefault(key, value)
    return fields


def _latest_checkpoint(run_dir: Path) -> str:
    latest = run_dir / CHECKPOINTS_SUBDIR / LATEST_POINTER
    if latest.is_symlink():
        return str(latest.parent / os.readlink(latest))
    if latest.is_file():  # a pointer file holding the checkpoint's name
        return latest.read_text(encoding="utf-8", errors="replace").strip()
    return str(latest) if latest.is_dir() else ""


def _last_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in reversed(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if isinstance(value, dict):
            return value
    return None


def job_status(run_dir: Path) -> JobStatus:
    run_dir = Path(run_dir).absolute()
    if not run_dir.is_dir():
        raise LaunchError(f"run directory {run_dir} does not exist; pass the directory `dtrain slurm submit` printed.")
    job_id = ""
    record = run_dir / JOB_RECORD
    if record.is_file():
        try:
            job_id = str(json.loads(record.read_text(encoding="utf-8"))["job_id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LaunchError(f'{record} is not a dtrain job record; it should hold {{"job_id": ...}}.') from None
    fields = _scontrol_job(job_id) if job_id else {}
    restart = fields.get("Restarts", "")
    return JobStatus(
        run_dir=run_dir,
        job_id=job_id,
        state=fields.get("JobState", "finished/unknown (no longer known to SLURM)" if job_id else "not submitted"),
        restart_count=int(restart) if restart.isdigit() else None,
        reason=fields.get("Reason", ""),
        latest_checkpoint=_latest_checkpoint(run_dir),
        last_metrics=_last_metrics(run_dir),
    )
