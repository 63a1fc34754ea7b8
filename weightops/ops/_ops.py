"""Operator schemas, declared once for every backend.

The pure-torch reference is registered as the "default" kernel (all devices);
the native extension only adds CPU/CUDA kernels for the same schemas
(TORCH_LIBRARY_IMPL in kernels/), which the dispatcher then prefers.
Scalars cross the boundary already rounded to fp32 and in canonical form
(flattened keys, explicit rescales, concrete out dtype) so both sides see
exactly the same numbers.
"""
from __future__ import annotations

import torch

from weightops.ops import reference as ref

_lib = torch.library.Library("weightops", "DEF")

SCHEMAS = {
    "delta_merge": "(Tensor base, Tensor[] models, float[] weights, int offset, int[] keys, "
                   "int drop_threshold, float[] rescales, float[]? lo, float[]? hi, str consensus, "
                   "float lam, ScalarType out_dtype) -> Tensor",
    "weighted_sum": "(Tensor[] xs, float[] weights, ScalarType out_dtype) -> Tensor",
    "abs_histogram": "(Tensor x, Tensor? base, int prefix) -> Tensor",
    "philox_keep_mask_out": "(Tensor(a!) out, int k0, int k1, int offset, int drop_threshold) -> ()",
}
for _name, _schema in SCHEMAS.items():
    torch.library.define(f"weightops::{_name}", _schema, lib=_lib)


def _pairs(keys):
    return [(keys[2 * i], keys[2 * i + 1]) for i in range(len(keys) // 2)]


@torch.library.impl("weightops::delta_merge", "default", lib=_lib)
def _delta_merge(base, models, weights, offset, keys, drop_threshold, rescales, lo, hi, consensus, lam, out_dtype):
    return ref.delta_merge(base, models, weights, offset=offset, keys=_pairs(keys), drop_threshold=drop_threshold,
                           rescales=rescales, lo=lo, hi=hi, consensus=consensus, lam=lam, out_dtype=out_dtype)


@torch.library.impl("weightops::weighted_sum", "default", lib=_lib)
def _weighted_sum(xs, weights, out_dtype):
    return ref.weighted_sum(xs, weights, out_dtype)


@torch.library.impl("weightops::abs_histogram", "default", lib=_lib)
def _abs_histogram(x, base, prefix):
    return ref.abs_histogram(x, base, prefix)


@torch.library.impl("weightops::philox_keep_mask_out", "default", lib=_lib)
def _philox_keep_mask_out(out, k0, k1, offset, drop_threshold):
    out.copy_(ref.philox_keep_mask((k0, k1), offset, out.numel(), drop_threshold, out.device))


@torch.library.register_fake("weightops::delta_merge", lib=_lib)
def _(base, models, weights, offset, keys, drop_threshold, rescales, lo, hi, consensus, lam, out_dtype):
    return base.new_empty(base.shape, dtype=out_dtype)


@torch.library.register_fake("weightops::weighted_sum", lib=_lib)
def _(xs, weights, out_dtype):
    return xs[0].new_empty(xs[0].shape, dtype=out_dtype)


@torch.library.register_fake("weightops::abs_histogram", lib=_lib)
def _(x, base, prefix):
    return x.new_empty(65536, dtype=torch.int64)


@torch.library.register_fake("weightops::philox_keep_mask_out", lib=_lib)
def _(out, k0, k1, offset, drop_threshold):
    return None
