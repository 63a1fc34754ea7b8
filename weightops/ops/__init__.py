"""Block-wise weight-space operators.

Every op works on flat blocks of a tensor; `offset` is the global index of the
block's first element, so random masks (and hence results) do not depend on
how a tensor is cut into blocks. Each op has a pure-torch reference kernel
(`reference.py`, the specification) and optionally native CPU/CUDA kernels
(`kernels/`, loaded lazily as `weightops._C`) that are bit-identical to it.

Kernel choice is process-wide: `use_kernels("auto"|"reference"|"native")`,
default from the environment variable WEIGHTOPS_KERNELS (default "auto":
native when the extension loads, reference otherwise).
"""
from __future__ import annotations

import hashlib
import math
import os

import torch

from weightops.errors import WeightopsError
from weightops.ops import _ext, _ops  # noqa: F401  (_ops registers the schemas)
from weightops.ops import reference as _ref
from weightops.ops.threshold import kth_largest_abs

__all__ = [
    "model_key", "drop_threshold", "philox_keep_mask", "delta_merge", "weighted_sum", "abs_histogram",
    "kth_largest_abs", "use_kernels", "kernels_in_use", "has_kernel",
]

_MODES = ("auto", "reference", "native")
_mode: str | None = None  # None: not resolved yet (read WEIGHTOPS_KERNELS on first use)
_DROP_ONE = 1 << 24
_CUDA_MAX_MODELS = 16  # launch-parameter limit of the CUDA kernels (kernels/cuda/ops_cuda.cu)


def use_kernels(mode: str) -> None:
    """Choose the kernels for this process. "native" fails now if the extension cannot load."""
    global _mode
    if mode not in _MODES:
        raise WeightopsError(f"unknown kernels mode {mode!r} (expected one of {', '.join(_MODES)})")
    if mode == "native" and not _ext.load():
        raise WeightopsError(f"native kernels requested but unavailable: {_ext.status()['reason']}")
    _mode = mode


def kernels_in_use() -> str:
    """"native" or "reference": what the current mode resolves to."""
    if _mode is None:
        use_kernels(os.environ.get("WEIGHTOPS_KERNELS", "auto") or "auto")
    if _mode == "reference":
        return "reference"
    return "native" if _ext.load() else "reference"


def has_kernel(op_name: str, device: str) -> bool:
    """Whether a native kernel for weightops::<op_name> exists on device ("cpu", "cuda")."""
    if not _ext.load():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"weightops::{op_name}", key)
    except RuntimeError:
        return False


def model_key(seed: int, model_index: int, tensor_name: str) -> tuple[int, int]:
    h = hashlib.blake2b(f"{seed}\x00{model_index}\x00{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(h[:4], "little"), int.from_bytes(h[4:], "little")


def drop_threshold(p: float) -> int:
    """Philox threshold for DROP probability p: an element survives with probability 1 - thr / 2**24."""
    return min(max(round(p * _DROP_ONE), 0), _DROP_ONE)


def _f32(xs) -> list[float]:
    """Round Python floats to fp32 once, here, so reference and native multiply by the same numbers."""
    return torch.tensor([float(v) for v in xs], dtype=torch.float64).to(torch.float32).tolist()


def _native(x=None, nmodels: int = 0) -> bool:
    if kernels_in_use() != "native":
        return False
    return not (x is not None and x.is_cuda and nmodels > _CUDA_MAX_MODELS)


def _check_key(key) -> tuple[int, int]:
    k0, k1 = int(key[0]), int(key[1])
    if not (0 <= k0 <= 0xFFFFFFFF and 0 <= k1 <= 0xFFFFFFFF):
        raise ValueError(f"philox key words must be uint32, got {key}")
    return k0, k1


def _check_threshold(thr: int) -> int:
    thr = int(thr)
    if not 0 <= thr <= _DROP_ONE:
        raise ValueError(f"drop_threshold must be in [0, 2**24], got {thr}")
    return thr


def philox_keep_mask(key, offset: int, numel: int, drop_threshold: int, device="cpu") -> torch.Tensor:
    """bool[numel]: which of elements offset .. offset+numel-1 survive a drop with this threshold."""
    k0, k1 = _check_key(key)
    thr = _check_threshold(drop_threshold)
    if offset < 0 or numel < 0:
        raise ValueError("offset and numel must be non-negative")
    if not _native():
        return _ref.philox_keep_mask((k0, k1), offset, numel, thr, device)
    out = torch.empty(numel, dtype=torch.bool, device=device)
    torch.ops.weightops.philox_keep_mask_out(out, k0, k1, offset, thr)
    return out


def delta_merge(base, models: list, weights: list[float], *, offset: int = 0,
                keys: list[tuple[int, int]] | None = None, drop_threshold: int = 0,
                rescales: list[float] | None = None, lo: list[float] | None = None,
                hi: list[float] | None = None, consensus: str = "sum", lam: float = 1.0,
                out_dtype=None) -> torch.Tensor:
    """base + lam * merge_i(w_i * keep_i * rescale_i * (x_i - base)), element-wise in fp32.

    keep_i: lo_i <= |d| < hi_i (magnitude trim, when given) and the Philox
    draw survives `drop_threshold` (DARE, with keys[i]). consensus "sum" adds
    the weighted deltas; "ties" keeps only those agreeing in sign with their
    weighted sum and takes their weighted mean (TIES merging).
    """
    n = len(models)
    if len(weights) != n:
        raise ValueError(f"{n} models but {len(weights)} weights")
    if consensus not in ("sum", "ties"):
        raise ValueError(f"unknown consensus {consensus!r} (expected 'sum' or 'ties')")
    for name, lst in (("rescales", rescales), ("lo", lo), ("hi", hi)):
        if lst is not None and len(lst) != n:
            raise ValueError(f"{n} models but {len(lst)} {name}")
    thr = _check_threshold(drop_threshold)
    if thr > 0 and (keys is None or len(keys) != n):
        raise ValueError("drop_threshold > 0 needs one philox key per model")
    if offset < 0:
        raise ValueError("offset must be non-negative")
    for x in models:
        if x.numel() != base.numel():
            raise ValueError(f"block size mismatch: base has {base.numel()} elements, a model {x.numel()}")
    out_dtype = out_dtype or base.dtype
    flat_base = base.reshape(-1)
    flat_models = [x.reshape(-1) for x in models]
    keys = [_check_key(k) for k in keys] if thr > 0 else []
    weights, lam = _f32(weights), _f32([lam])[0]
    rescales = _f32(rescales) if rescales is not None else [1.0] * n
    lo = _f32(lo) if lo is not None else None
    hi = _f32(hi) if hi is not None else None
    if _native(base, n):
        out = torch.ops.weightops.delta_merge(flat_base, flat_models, weights, offset, [k for kk in keys for k in kk],
                                              thr, rescales, lo, hi, consensus, lam, out_dtype)
    else:
        out = _ref.delta_merge(flat_base, flat_models, weights, offset=offset, keys=keys, drop_threshold=thr,
                               rescales=rescales, lo=lo, hi=hi, consensus=consensus, lam=lam, out_dtype=out_dtype)
    return out.reshape(base.shape)


def weighted_sum(xs: list, weights: list[float], out_dtype=None) -> torch.Tensor:
    """sum_i w_i * x_i in fp32, in list order, cast to out_dtype (default xs[0].dtype)."""
    if not xs or len(xs) != len(weights):
        raise ValueError(f"weighted_sum needs matching non-empty lists, got {len(xs)} tensors, {len(weights)} weights")
    for x in xs:
        if x.numel() != xs[0].numel():
            raise ValueError("weighted_sum: blocks differ in size")
    out_dtype = out_dtype or xs[0].dtype
    flat = [x.reshape(-1) for x in xs]
    weights = _f32(weights)
    if _native(xs[0], len(xs)):
        out = torch.ops.weightops.weighted_sum(flat, weights, out_dtype)
    else:
        out = _ref.weighted_sum(flat, weights, out_dtype)
    return out.reshape(xs[0].shape)


def abs_histogram(x, base=None, prefix: int = -1) -> torch.Tensor:
    """int64[65536] histogram of the fp32 bits of |x - base|: of the high 16 bits
    (prefix < 0), or of the low 16 bits of elements whose high bits == prefix."""
    if base is not None and base.numel() != x.numel():
        raise ValueError("abs_histogram: x and base differ in size")
    if prefix > 0xFFFF:
        raise ValueError(f"prefix must be < 65536, got {prefix}")
    x = x.reshape(-1)
    base = base.reshape(-1) if base is not None else None
    if _native():
        return torch.ops.weightops.abs_histogram(x, base, int(prefix))
    return _ref.abs_histogram(x, base, int(prefix))
