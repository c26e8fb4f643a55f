"""Placeholder: replaced by the module that implements `dtrain data`."""

import click


@click.group(name="data")
def data() -> None:
    """(not implemented yet)"""
