"""`weightops run RECIPE.yaml`: run a recipe's steps in order (see weightops.recipes)."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from weightops.cli import app


@app.command("run")
def run(
    recipe: Optional[str] = typer.Argument(None, help="A recipe YAML file, or a mergekit config (a file with merge_method)."),
    out: Optional[str] = typer.Argument(None, help="Output directory: sets the variable `out` (a mergekit config's output, "
                                                  "as in `mergekit-yaml CONFIG OUT`)."),
    force: bool = typer.Option(False, help="Replace outputs that exist (every step that writes one; only once the new one is complete)."),
    no_card: bool = typer.Option(False, "--no-card", help="Write no README.md model card next to output models."),
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

    Examples: weightops run examples/recipes/port_patch.yaml --set out=runs/port
              weightops run mergekit.yml ./merged --force      (like mergekit-yaml mergekit.yml ./merged)
    """
    from weightops import card
    from weightops.recipes import RecipeError, load_steps, parse_set, run_recipe

    if list_steps:
        for name, s in sorted(load_steps().items()):
            typer.echo(f"{name:<16} {s.summary}")
        return
    if recipe is None:
        raise typer.BadParameter("give a recipe file (or --list-steps)")
    values = parse_set(set_vars)
    if out is not None:
        if "out" in values and values["out"] != out:
            raise typer.BadParameter(f"OUT ({out}) and --set out={values['out']} disagree; give one")
        values["out"] = out
    try:
        with card.disabled(no_card):
            result = run_recipe(recipe, values, dry_run=dry_run, continue_on_error=continue_on_error, quiet=quiet,
                                force=force)
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
