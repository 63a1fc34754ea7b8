"""Delta-parameter pruning (DPP): DARE, DAREx-q (with q selection), magnitude, WANDA, DELLA.

    from weightops.dpp import prune, apply_delta, delta_stats, recommend_dpp
    prune("base", "ft", out="ft-p99", method="darex-q", rate=0.99, q="auto", proxy_data="texts.txt")

See docs/dpp.md. Importing this package is cheap; the functions load torch.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "prune": "weightops.dpp.api:prune",
    "apply_delta": "weightops.dpp.api:apply_delta",
    "select_q": "weightops.dpp.api:select_q",
    "delta_stats": "weightops.dpp.stats:delta_stats",
    "recommend_dpp": "weightops.dpp.stats:recommend_dpp",
    "calibrate": "weightops.dpp.calibration:calibrate",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'weightops.dpp' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
