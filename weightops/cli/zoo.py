"""`weightops zoo ...`: build and list the real-model zoo (placeholder until the zoo lands)."""
import typer

from weightops.cli import app

zoo_app = typer.Typer(help="Build and list the real-model zoo of fine-tuned MiniLM checkpoints.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
