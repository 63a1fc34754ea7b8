"""weightops: weight-space surgery on neural-network checkpoints.

Importing weightops is cheap: torch and the heavy modules load on first use
of the functions below (PEP 562 lazy attributes).

    import weightops
    weightops.merge(["ft_a", "ft_b"], base="base", method="ties", out="merged")
    weightops.inspect("merged"); weightops.diff("base", "merged"); weightops.verify("merged")
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> "module:attribute"
_LAZY = {
    "merge": "weightops.engine:merge",
    "run_streaming": "weightops.engine:run_streaming",
    "inspect": "weightops.info:inspect",
    "diff": "weightops.info:diff",
    "verify": "weightops.info:verify",
    "Checkpoint": "weightops.io.checkpoint:Checkpoint",
    "LoraAdapter": "weightops.io.adapter:LoraAdapter",
    "WeightopsError": "weightops.errors:WeightopsError",
    "create_patch": "weightops.patches.create:create_patch",
    "check_patch": "weightops.patches.check:check_patch",
    "apply_patch": "weightops.patches.apply:apply_patch",
    "run_recipe": "weightops.recipes:run_recipe",
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'weightops' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
