"""CLI commands of this family register on `weightops.cli.app` here (being written)."""
from weightops.cli import app  # noqa: F401
