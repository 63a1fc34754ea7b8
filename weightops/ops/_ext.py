"""Lazy, never-fatal loading of the native extension `weightops._C`.

The .so only registers CPU/CUDA kernels for the schemas of `_ops`; if it is
missing or broken every op still runs on its reference kernel, so the reason
is logged once and remembered for `weightops doctor`.
"""
from __future__ import annotations

import glob
import logging
import os
import threading

log = logging.getLogger("weightops.ops")
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_lock = threading.Lock()
_state: dict = {"tried": False, "loaded": False, "reason": "not tried yet", "path": None}


def library_path() -> str | None:
    found = sorted(glob.glob(os.path.join(_PKG_DIR, "_C*.so")) + glob.glob(os.path.join(_PKG_DIR, "_C*.pyd")))
    return found[0] if found else None


def load() -> bool:
    with _lock:
        if _state["tried"]:
            return _state["loaded"]
        _state["tried"] = True
        from weightops.ops import _ops  # noqa: F401  (schemas must exist before the impls)
        import torch

        path = library_path()
        if os.environ.get("WEIGHTOPS_DISABLE_EXT", "") == "1":
            _state["reason"] = "disabled by WEIGHTOPS_DISABLE_EXT=1"
        elif path is None:
            _state["reason"] = ("not built: no weightops/_C*.so (install with `pip install --no-build-isolation -e .`; "
                                "see setup.py)")
        else:
            try:
                torch.ops.load_library(path)
                _state.update(loaded=True, reason="loaded", path=path)
            except Exception as e:  # a stale build for another torch, missing symbols...
                _state["reason"] = f"failed to load {os.path.basename(path)}: {type(e).__name__}: {e}"
                log.warning("weightops native kernels unavailable (%s); using the pure-torch reference",
                            _state["reason"])
                return False
        if not _state["loaded"]:
            log.info("weightops native kernels unavailable (%s); using the pure-torch reference", _state["reason"])
        return _state["loaded"]


def status() -> dict:
    load()
    return dict(_state)
