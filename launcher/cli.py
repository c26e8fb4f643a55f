"""`dtrain` command line. Subcommands live in ``launcher/cmd_*.py``; none imports torch at load."""

from __future__ import annotations

import importlib
import sys
import traceback

import click

from dist_train.errors import DTrainError

# (module, attribute) of each subcommand, in help order.
_SUBCOMMANDS = [
    ("launcher.cmd_launch", "launch"),
    ("launcher.cmd_gpus", "gpus"),
    ("launcher.cmd_data", "data"),
    ("launcher.cmd_ckpt", "ckpt"),
    ("launcher.cmd_eval", "eval_cmd"),
    ("launcher.cmd_slurm", "slurm"),
]


class _Context:
    verbose: bool = False


STATE = _Context()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--verbose", "-v", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="dtrain", message="dtrain %(version)s")
def cli(verbose: bool) -> None:
    """dtrain: distributed PyTorch training with free-GPU reservation, exact metrics and safe resume.

    \b
    Quick start (CPU is fine):
      dtrain launch configs/quickstart.toml
    """
    STATE.verbose = verbose


def _register() -> None:
    for module_name, attr in _SUBCOMMANDS:
        module = importlib.import_module(module_name)
        cli.add_command(getattr(module, attr))


_register()


def report_error(exc: BaseException, verbose: bool) -> None:
    if verbose:
        traceback.print_exception(exc)
    click.echo(f"dtrain: error: {exc}", err=True)


def _setup_cli_logging() -> None:
    """Library warnings (e.g. a corrupt checkpoint skipped) reach the user as `dtrain: warning: ...`."""
    import logging

    logger = logging.getLogger("dtrain")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("dtrain: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    _setup_cli_logging()
    verbose = "--verbose" in (argv or sys.argv[1:]) or "-v" in (argv or sys.argv[1:])
    try:
        # Without standalone mode click returns (not raises) the code of a command's Exit.
        code = cli.main(args=argv, prog_name="dtrain", standalone_mode=False)
    except DTrainError as exc:
        report_error(exc, verbose)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("dtrain: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
