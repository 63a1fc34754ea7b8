"""The `weightops` command line.

One typer app; each command family lives in its own module and registers on
`app` when imported below. Command modules import torch and the heavy parts of
weightops inside the command functions only, so `weightops --help` stays fast.
"""
from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="weightops",
    help="Weight-space surgery on checkpoints: merge, prune, patch, graft, analyse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Registration by import: each module adds its commands (or a sub-app) to `app`.
from weightops.cli import (  # noqa: E402,F401
    doctor,
    graft,
    intruders,
    merge,
    patch,
    prune,
    recipes,
    soup,
    zoo,
)


def main() -> None:
    from weightops.errors import WeightopsError

    from weightops import card

    # every model-writing command takes --no-card (no README.md model card); one spelling, read here once
    no_card = "--no-card" in sys.argv[1:]
    if no_card and sys.argv[1:2] not in (["merge"], ["run"]):  # those two declare it for their --help
        sys.argv.remove("--no-card")
    try:
        with card.disabled(no_card):
            app()
    except WeightopsError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
