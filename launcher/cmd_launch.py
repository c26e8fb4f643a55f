"""Placeholder for `dtrain launch`."""

import click


@click.command(name="launch")
def launch() -> None:
    """(not implemented yet)"""
