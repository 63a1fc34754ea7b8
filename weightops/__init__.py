"""weightops: weight-space surgery on neural-network checkpoints.

Importing weightops is cheap: torch and the heavy modules load on first use.
"""
__version__ = "0.1.0"
