"""`weightops zoo build|list`: the real-model zoo of fine-tuned MiniLM checkpoints (weightops.zoo)."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from weightops.cli import app

zoo_app = typer.Typer(help="Build and list the real-model zoo of fine-tuned MiniLM checkpoints.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def build_cmd(
    only: Optional[List[str]] = typer.Option(None, "--only", help="Build this model (and its parents); repeatable."),
    fast: bool = typer.Option(False, "--fast", help="Only the subset the tests and the demo use."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Build the zoo under $WEIGHTOPS_ZOO (default ~/.cache/weightops/zoo), skipping cached models."""
    from weightops import zoo

    paths = zoo.build(names=only or None, fast=fast, progress=not quiet)
    if not quiet:
        typer.echo(f"{len(paths)} model(s) ready in {zoo.zoo_dir()}")


def _score(card: dict, split: str) -> str:
    scores = card.get("scores", {})
    task = card.get("task")
    if task and task in scores:
        return f"{scores[task][split]:.3f}"
    return "-"


@zoo_app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the cards of the built models as JSON."),
    tiny: bool = typer.Option(False, "--tiny", help="Also list the unit-test models."),
) -> None:
    """The catalogue: each model's kind, task, parent, whether it is built, and its held-out accuracy."""
    from weightops.zoo import builder as B
    from weightops.zoo import catalogue as C
    from weightops.zoo.runtime import zoo_dir

    if as_json:
        typer.echo(json.dumps(B.list_models(), indent=2))
        return
    root = zoo_dir()
    names = C.NAMES + (C.TINY_NAMES if tiny else [])
    keys = B.keys(names)
    typer.echo(f"zoo: {root}   (fast subset marked *)")
    typer.echo(f"{'name':32} {'kind':12} {'task':10} {'parent':22} {'status':8} {'test':>6} {'shifted':>7}")
    for n in names:
        r = C.CATALOGUE[n]
        card = B.read_card(root / n)
        status = "built" if B.is_built(root / n, keys[n]) else ("stale" if card else "missing")
        mark = "*" if n in C.FAST_NAMES else " "
        test = _score(card, "test") if card else "-"
        shifted = _score(card, "test_shifted") if card else "-"
        typer.echo(f"{mark}{n:31} {r['kind']:12} {r['task'] or '-':10} {r['parent'] or '-':22} {status:8} {test:>6} {shifted:>7}")
