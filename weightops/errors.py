"""User-facing errors.

Anything the user can fix (bad path, mismatched checkpoints, corrupt file, full
disk) is raised as a WeightopsError with a one-line message; the CLI prints it
as `error: <message>` and exits with status 2. Anything else is a bug and keeps
its traceback.
"""


class WeightopsError(Exception):
    """An error caused by the input or the environment, reported in one line."""

    exit_code = 2


class CheckpointError(WeightopsError):
    """A checkpoint is missing, unreadable, corrupt or of an unsupported format."""


class AlignmentError(WeightopsError):
    """Checkpoints to combine do not match (names, shapes, dtypes)."""


class NumericError(WeightopsError):
    """NaN/Inf in inputs (with --strict) or overflow when casting the output."""


class OutputError(WeightopsError):
    """The output cannot be written (exists, disk full, permissions)."""
