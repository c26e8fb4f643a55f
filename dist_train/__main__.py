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

from dist_train import envvars
from dist_train.errors import DTrainError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dist_train", description="Run the dtrain training loop in this process.")
    p.add_argument("config", help="TOML config file (the launcher passes the run directory's config.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--verbose", action="store_true", help="show tracebacks for configuration errors")
    return p.parse_args(argv)


def resolve_run_dir(cfg_path: str) -> Path | None:
    run_dir = envvars.get(envvars.RUN_DIR)
    if run_dir:
        return Path(run_dir)
    return None


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # torch.distributed.elastic's @record writes this process's exception to torchrun's error file,
    # so the launcher can say which rank failed and why.
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_run)(args)


def _run(args: argparse.Namespace) -> int:
    from dist_train.config import load_config, resolve_data_path, save_config
    from dist_train.distributed import destroy_distributed, init_distributed
    from dist_train.logs import setup_logging
    from dist_train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    cfg.data.path = str(resolve_data_path(cfg))
    debug = envvars.get(envvars.DEBUG) == "1"
    run_dir = resolve_run_dir(args.config)
    info = init_distributed(cfg.launch.pg_timeout)
    try:
        console = str(info.rank) in cfg.launch.console_ranks.split(",") or cfg.launch.console_ranks == "all"
        setup_logging(run_dir, info.rank, console=console)
        if run_dir is not None and info.is_main and not (run_dir / "config.toml").exists():
            save_config(cfg, run_dir / "config.toml")
        trainer = Trainer(cfg, run_dir, info, debug=debug)
        return trainer.fit()
    finally:
        destroy_distributed()


def main(argv: list[str] | None = None) -> int:
    verbose = "--verbose" in (argv if argv is not None else sys.argv[1:])
    try:
        return run(argv)
    except DTrainError as exc:
        if verbose or os.environ.get(envvars.DEBUG) == "1":
            traceback.print_exc()
        logging.getLogger("dtrain").error("error: %s", exc)
        print(f"dtrain worker: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
