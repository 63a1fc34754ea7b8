"""Whole-tensor references for the sparse operators (small, obviously right; the tests hold the
streaming code to them). State dicts in, state dicts or {name: bool mask} out."""
from __future__ import annotations

import torch

from weightops.ops import drop_threshold, model_key
from weightops.ops.reference import philox_keep_mask


def top_delta_mask(base: dict, ft: dict, names: list[str], k: int) -> dict:
    """The k largest |ft - base| over `names` together; ties by position (tensor order, then flat index)."""
    d = torch.cat([(ft[n].float() - base[n].float()).abs().flatten() for n in names])
    order = torch.argsort(-d, stable=True)  # descending, equal values keep their position order
    flat = torch.zeros(d.numel(), dtype=torch.bool)
    flat[order[:k]] = True
    out, pos = {}, 0
    for n in names:
        m = base[n].numel()
        out[n] = flat[pos:pos + m].reshape(base[n].shape)
        pos += m
    return out


def apply_mask(base: dict, ft: dict, masks: dict) -> dict:
    return {n: (torch.where(masks[n], ft[n], base[n]) if n in masks else base[n]) for n in base}


def add_deltas(base: dict, deltas: list[dict], scales: list[float]) -> dict:
    """θ0 + Σ s_i δ_i in fp32, in order, cast to the base dtype; deltas are {name: dense fp32 tensor}."""
    out = {}
    for n, t in base.items():
        acc = t.float().clone()
        for d, s in zip(deltas, scales):
            if n in d:
                acc += s * d[n].float()
        out[n] = acc.to(t.dtype) if n in set().union(*deltas) else t
    return out


def reset_keep_mask(name: str, shape, fraction: float, by: str, seed: int) -> torch.Tensor:
    """Which elements keep their fine-tuned value (the rest are reset to the base)."""
    key, thr = model_key(seed, 0, name), drop_threshold(fraction)
    n = 1
    for s in shape:
        n *= s
    if by == "parameter":
        keep = philox_keep_mask(key, 0, n, thr)
    elif by == "row":
        rows = shape[0] if len(shape) else 1
        keep = philox_keep_mask(key, 0, rows, thr).repeat_interleave(n // rows if rows else 0)
    elif by == "tensor":
        keep = philox_keep_mask(key, 0, 1, thr).expand(n)
    else:
        raise ValueError(by)
    return keep.reshape(shape)
