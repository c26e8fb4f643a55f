"""`dtrain slurm script|submit|status`: run a config as a requeueable SLURM batch job."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dist_train.config import Config, load_config


def _resource_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by `script` and `submit`; unset ones fall back to the config's [slurm] section.

    Each option the commands do not take by name is named after the SbatchOptions field it overrides."""
    options = [
        click.argument("config", type=click.Path(dir_okay=False, path_type=Path)),
        click.option("--nodes", type=int, help="Nodes to allocate (one `dtrain launch` per node)."),
        click.option("--gpus-per-node", type=int, help="GPUs per node; 0 = CPU-only nodes."),
        click.option("--nproc-per-node", type=int, help="Workers per node (default: the GPUs per node, or 1 on CPU)."),
        click.option("--cpus-per-task", type=int, help="CPU cores per node task (shared by that node's workers)."),
        click.option("--mem", help="Memory per node, e.g. 64G."),
        click.option("--time", help="Time limit, e.g. 04:00:00 or 1-00:00:00."),
        click.option("--partition", help="SLURM partition."),
        click.option("--account", help="SLURM account to charge."),
        click.option("--qos", help="Quality of service."),
        click.option("--constraint", help="Node features, e.g. a100."),
        click.option("--job-name", help="Job name (default: run.name)."),
        click.option("--signal-grace", type=int, help="Seconds before the time limit at which workers checkpoint."),
        click.option("--max-requeues", type=int, help="How often a preempted job requeues itself."),
        click.option(
            "--run-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="Run directory (default: <run.output_dir>/<run.name>/<timestamp>).",
        ),
        click.option(
            "--sbatch-arg",
            "sbatch_args",
            multiple=True,
            help="Extra #SBATCH option, e.g. --sbatch-arg=--exclusive (repeatable).",
        ),
        click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="SECTION.KEY=VALUE",
            help="Override a config value (repeatable).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _options(cfg: Config, kw: dict[str, Any]) -> Any:
    """The config's [slurm] section with the options given on the command line (``kw``: field -> value)."""
    from launcher.slurm import SbatchOptions

    return SbatchOptions.from_config(cfg.slurm, **{**kw, "sbatch_args": list(kw["sbatch_args"]) or None})


@click.group(name="slurm")
def slurm() -> None:
    """Run a config as a SLURM batch job that checkpoints and requeues itself when preempted.

    \b
      dtrain slurm script cfg.toml --nodes 2 --gpus-per-node 4 --time 04:00:00   # print the script
      dtrain slurm submit cfg.toml --nodes 2 --gpus-per-node 4 --time 04:00:00   # write + sbatch it
      dtrain slurm status runs/NAME/TIMESTAMP                                     # state, checkpoint, metrics
    """


@slurm.command(name="script")
@_resource_options
def script_cmd(config: Path, run_dir: Path | None, overrides: tuple[str, ...], **kw: Any) -> None:
    """Print the batch script `submit` would write (nothing is created)."""
    from launcher.slurm import new_run_dir, render_script

    cfg = load_config(config, list(overrides))
    target = run_dir if run_dir is not None else new_run_dir(cfg)
    click.echo(render_script(_options(cfg, kw), target, job_name=cfg.run.name), nl=False)


@slurm.command(name="submit")
@_resource_options
def submit_cmd(config: Path, run_dir: Path | None, overrides: tuple[str, ...], **kw: Any) -> None:
    """Write the run directory (config.toml, dtrain.sbatch) and submit it with sbatch."""
    from launcher.slurm import new_run_dir, submit

    cfg = load_config(config, list(overrides))
    target = run_dir if run_dir is not None else new_run_dir(cfg)
    sub = submit(cfg, _options(cfg, kw), target)
    click.echo(f"Submitted SLURM job {sub.job_id}")
    click.echo(f"  run dir: {sub.run_dir}")
    click.echo(f"  script:  {sub.script}")
    click.echo(f"  logs:    {sub.stdout_log} (stderr: {sub.stderr_log.name})")
    click.echo(f"  status:  dtrain slurm status {sub.run_dir}")


@slurm.command(name="status")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
def status_cmd(run_dir: Path) -> None:
    """Job state, restarts, latest checkpoint and last metrics of a submitted run (also after the job ended)."""
    from launcher.slurm import job_status

    for line in job_status(run_dir).lines():
        click.echo(line)
