"""Placeholder: replaced by the module that implements `dtrain eval`."""

import click


@click.command(name="eval")
def eval_cmd() -> None:
    """(not implemented yet)"""
