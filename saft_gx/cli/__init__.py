"""The ``saft-gx`` command: each subcommand is a few lines over the library modules.

User errors (``SaftError``) become one line on stderr and exit status 1; Click's usage errors exit 2.
"""

from __future__ import annotations

import sys

import click

from ..core.errors import SaftError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except SaftError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted; finished work is kept in the embedding cache", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="saft-gx")
def cli() -> None:
    """Find harmful rows in LLM fine-tuning datasets with SAFT subspace scores."""


def _register() -> None:
    from . import audit, calibrate, finetune, query, score, shards, validate

    for module in (score, shards, query, validate, finetune, calibrate, audit):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="saft-gx")
