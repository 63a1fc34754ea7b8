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


# float32 is the compute dtype of every operator: a knob it cannot hold is as meaningless as NaN.
FLOAT32_MAX = 3.4028234663852886e38
_FLAGS = {"lam": "lambda"}


def check_finite(**knobs) -> None:
    """Every numeric knob is a finite number within float32's range; lists (and dict values) item by item.

    NaN, ±Inf and |x| > 3.4e38 are errors naming the knob (`lam` is spelled --lambda); None, strings
    and booleans pass (their own checks apply)."""
    import math

    for name, value in knobs.items():
        if isinstance(value, dict):
            value = list(value.values())
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v) or abs(v) > FLOAT32_MAX:
                flag = "--" + _FLAGS.get(name, name).replace("_", "-")
                raise WeightopsError(f"{flag} must be a finite number within the float32 range, got {v!r}")
