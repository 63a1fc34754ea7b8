"""Merge methods, one module per family; importing this registers them all."""
from weightops.methods import interpolation, selective, sparse_consensus, spherical, task_arithmetic  # noqa: F401
from weightops.methods.base import ALIASES, REGISTRY, MergeParams, Method, get_method  # noqa: F401
