"""Worker entry: ``python -m dist_train CONFIG [--set section.key=value ...]``.

Runs alone (one process, no process group) or under torchrun's environment. Settings come from
the config file; the launcher adds only the DTRAIN_* variables of dist_train.envvars.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from dist_train import envvars
from dist_train.config import Config, load_config, make_data_paths_absolute, save_config
from dist_train.distributed.comm import destroy_distributed, init_distributed
from dist_train.errors import DTrainError
from dist_train.logs import FILE_ONLY, setup_logging
from dist_train.preempt import PreemptionHandler, launcher_stop_signal_file, parse_signals
from dist_train.trainer import Trainer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dist_train", description="Run the dtrain training loop in this process."
    )
    p.add_argument("config", help="TOML config file (the launcher passes the run directory's config.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--verbose", action="store_true", help="show tracebacks for configuration errors")
    return p.parse_args(argv)


def resolve_run_dir(cfg: Config) -> Path:
    """The launcher names the run directory; a worker started by hand (or by a bare torchrun) uses
    ``<output_dir>/<name>/direct``, the same on every rank, so re-running the command resumes."""
    run_dir = envvars.get(envvars.RUN_DIR)
    if run_dir:
        return Path(run_dir)
    return Path(cfg.run.output_dir).expanduser().absolute() / cfg.run.name / "direct"


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # torch.distributed.elastic's @record writes this process's exception to torchrun's error file,
    # so the launcher can say which rank failed and why.
    return int(record(_run)(args) or 0)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    # Before the slow start-up (process group, data, model): a stop request from now on is kept
    # and honoured at the first step boundary instead of killing the worker.
    preemption = PreemptionHandler(parse_signals(cfg.launch.preempt_signals), launcher_stop_signal_file()).install()
    make_data_paths_absolute(cfg)  # the saved config.toml names the same files from any directory
    debug = envvars.get(envvars.DEBUG) == "1"
    run_dir = resolve_run_dir(cfg)
    info = init_distributed(cfg.launch.pg_timeout)
    log = logging.getLogger("dtrain")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        console = cfg.launch.console_ranks == "all" or str(info.rank) in cfg.launch.console_ranks.split(",")
        setup_logging(run_dir, info.rank, console=console)
        if info.distributed:
            log.info(
                "rank %d/%d (local %d), rendezvous %s:%s",
                info.rank,
                info.world_size,
                info.local_rank,
                os.environ.get("MASTER_ADDR", "?"),
                os.environ.get("MASTER_PORT", "?"),
            )
        if info.is_main and not (run_dir / "config.toml").exists():
            save_config(cfg, run_dir / "config.toml")
        try:
            trainer = Trainer(cfg, run_dir, info, debug=debug, preemption=preemption)
            return trainer.fit()
        except DTrainError:
            raise
        except Exception:
            # The rank's own log keeps the traceback. Under the launcher the console gets its summary
            # instead (the failing rank, its exception, this log): a console rank printing the
            # traceback too would show it twice, and a rank that only lost a failed peer would bury
            # the cause under its own connection error.
            log.exception("rank %d failed", info.rank, extra=FILE_ONLY if _launcher_reports() else None)
            raise
    finally:
        preemption.uninstall()
        destroy_distributed()


def report_error(exc: DTrainError) -> None:
    """One paragraph, once: in the rank's log file, and on stderr unless the launcher reports it."""
    log = logging.getLogger("dtrain")
    if log.handlers:  # without handlers logging would print it to stderr itself
        log.error("error: %s", exc, extra=FILE_ONLY)
    if envvars.get(envvars.LAUNCHER_REPORTS_ERRORS) != "1":
        print(f"dtrain worker: error: {exc}", file=sys.stderr)


def _launcher_reports() -> bool:
    return envvars.get(envvars.LAUNCHER_REPORTS_ERRORS) == "1"


def report_failure() -> int:
    """A rank's unexpected exception under the launcher: torchrun's error file (written by ``record``)
    and the rank log hold the traceback, and the launcher names the rank that failed first, so
    stderr gets it only where nothing logged it (a failure before logging was set up)."""
    if not logging.getLogger("dtrain").handlers:
        traceback.print_exc()
    return 1


def main(argv: list[str] | None = None) -> int:
    verbose = "--verbose" in (argv if argv is not None else sys.argv[1:])
    try:
        return run(argv)
    except DTrainError as exc:
        if verbose:
            traceback.print_exc()
        report_error(exc)
        return exc.exit_code
    except Exception:
        if verbose or not _launcher_reports():
            raise
        return report_failure()


if __name__ == "__main__":
    sys.exit(main())
