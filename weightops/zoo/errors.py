"""Zoo errors: one-line, user-fixable (missing optional dependency, unknown name)."""
from weightops.errors import WeightopsError


class ZooError(WeightopsError):
    """The zoo cannot be built or read: missing `examples` extra, unknown model or task."""
