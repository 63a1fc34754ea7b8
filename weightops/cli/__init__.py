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


def _finite_float_options(fn):
    """Every float option of a command is checked before the command runs (`--lambda nan`, `--t inf`,
    `--rate 1e39`: one error line naming the option); options parsed from text (--weights 1,2) are
    checked where they are parsed."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from weightops.errors import check_finite

        check_finite(**{k: v for k, v in kwargs.items() if isinstance(v, float)})
        return fn(*args, **kwargs)

    return run


def _check_every_command(t: typer.Typer) -> None:
    for info in t.registered_commands:
        info.callback = _finite_float_options(info.callback)
    for group in t.registered_groups:
        _check_every_command(group.typer_instance)


_check_every_command(app)


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
