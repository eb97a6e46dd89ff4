"""The operator CLI: `imagesync COMMAND`. A thin skin over the library.

Imports stay inside commands: `imagesync status` must answer without loading
openstacksdk or oslo.messaging.
"""

from __future__ import annotations

import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imagesync")
def main() -> None:
    """imagesync: keep Glance images in the stores your policy names."""


@main.group()
def policy() -> None:
    """Work with policy files."""


@policy.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def policy_check(file: str) -> None:
    """Validate a policy FILE; errors are printed as FILE:LINE:COL: message.

    Example: imagesync policy check /etc/imagesync/policy.yaml
    """
    from imagesync.policy import PolicyError, load_policy

    try:
        loaded = load_policy(file)
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    for warning in loaded.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{file}: OK, {len(loaded.rules)} rule(s)")
