"""Placeholder: replaced by the module that implements `dtrain slurm`."""

import click


@click.group(name="slurm")
def slurm() -> None:
    """(not implemented yet)"""
