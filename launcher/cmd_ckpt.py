"""Placeholder: replaced by the module that implements `dtrain ckpt`."""

import click


@click.group(name="ckpt")
def ckpt() -> None:
    """(not implemented yet)"""
