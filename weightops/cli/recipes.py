"""`weightops run RECIPE.yaml`: run a recipe's steps in order (see weightops.recipes)."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from weightops.cli import app


@app.command("run")
def run(
    recipe: Optional[str] = typer.Argument(None, help="A recipe YAML file."),
    set_vars: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe variable: name=value (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Expand and validate every step, print the plan, run nothing."),
    continue_on_error: Optional[bool] = typer.Option(None, "--continue-on-error/--stop-on-error",
                                                     help="Override the recipe's continue_on_error (default: stop at the first failure)."),
    report: Optional[str] = typer.Option(None, help="Also write the run's report (every step, status, output) to this JSON file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display or table."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
    list_steps: bool = typer.Option(False, "--list-steps", help="List the registered steps and exit."),
):
    """Run a recipe: merges, patch create/check/apply and other registered steps, in order, with one summary.

    Example: weightops run examples/recipes/port_patch.yaml --set out=runs/port
    """
    from weightops.recipes import RecipeError, load_steps, parse_set, run_recipe

    if list_steps:
        for name, s in sorted(load_steps().items()):
            typer.echo(f"{name:<16} {s.summary}")
        return
    if recipe is None:
        raise typer.BadParameter("give a recipe file (or --list-steps)")
    try:
        result = run_recipe(recipe, parse_set(set_vars), dry_run=dry_run, continue_on_error=continue_on_error, quiet=quiet)
    except RecipeError as e:
        if e.result is not None:
            _show(e.result, quiet, as_json, report)
        raise
    _show(result, quiet, as_json, report)


def _show(result, quiet: bool, as_json: bool, report: Optional[str]) -> None:
    from weightops.recipes import write_report

    if report:
        write_report(result, report)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2, default=str))
    elif not quiet:
        typer.echo(result.table())
