"""Placeholder: replaced by the module that implements `dtrain gpus`."""

import click


@click.group(name="gpus")
def gpus() -> None:
    """(not implemented yet)"""
