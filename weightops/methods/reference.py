"""Plain in-memory references of every merge method: whole tensors, whole models.

Small and obviously right, written straight from shared/methods.md with
stock torch (kthvalue on the concatenation, full-tensor dot products); the
tests and benchmarks hold the streaming engine to these. The DARE mask is the
one thing taken from weightops.ops: it is defined as the Philox stream of
`ops.reference.philox_keep_mask`, and any other generator would be another method.
"""
from __future__ import annotations

import math

import torch

from weightops.ops import drop_threshold, model_key
from weightops.ops.reference import philox_keep_mask


def _float_names(base: dict, exclude=()) -> list[str]:
    return [k for k, v in base.items() if v.is_floating_point() and k not in exclude]


def kth_largest(values: torch.Tensor, k: int) -> float:
    """k-th largest of a 1-D tensor, via torch.kthvalue (k-th smallest of n - k + 1)."""
    n = values.numel()
    if k <= 0:
        return math.inf
    if k > n:
        return 0.0
    return values.kthvalue(n - k + 1).values.item()


def keep_count(fraction: float, n: int) -> int:
    k = round(fraction * n)
    return max(k, 1) if fraction > 0 and n > 0 else k


def linear(models: list[dict], weights=None, normalize=True) -> dict:
    w = weights or [1.0] * len(models)
    if normalize:
        w = [x / sum(w) for x in w]
    out = {}
    for k in models[0]:
        if not models[0][k].is_floating_point():
            out[k] = models[0][k]
            continue
        out[k] = sum(wi * m[k].float() for wi, m in zip(w, models))
    return out


def slerp(a: dict, b: dict, t: float = 0.5) -> dict:
    out = {}
    for k in a:
        if not a[k].is_floating_point():
            out[k] = a[k]
            continue
        v0, v1 = a[k].double().flatten(), b[k].double().flatten()
        n0, n1 = v0.norm(), v1.norm()
        # mergekit: a vector of norm <= 1e-8 is not normalised (an all-zero tensor gives cos 0, θ = π/2)
        n0, n1 = (n if n > 1e-8 else torch.ones((), dtype=torch.float64) for n in (n0, n1))
        cos = (v0 @ v1 / (n0 * n1)).clamp(-1, 1).item()
        if abs(cos) > 0.9995:
            s0, s1 = 1 - t, t
        else:
            th = math.acos(cos)
            s0, s1 = math.sin((1 - t) * th) / math.sin(th), math.sin(t * th) / math.sin(th)
        out[k] = (s0 * a[k].double() + s1 * b[k].double()).float()
    return out


def model_stock(base: dict, models: list[dict]) -> dict:
    out, n = {}, len(models)
    for k in base:
        if not base[k].is_floating_point():
            out[k] = base[k]
            continue
        ds = [m[k].double().flatten() - base[k].double().flatten() for m in models]
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                d = (ds[i].norm() * ds[j].norm()).item()
                cos.append((ds[i] @ ds[j]).item() / d if d > 0 else 0.0)
        c = sum(cos) / len(cos)
        t = n * c / (1 + (n - 1) * c)
        mean = sum(m[k].double() for m in models) / n
        out[k] = (t * mean + (1 - t) * base[k].double()).float()
    return out


def task_vector_merge(base: dict, models: list[dict], *, weights=None, lam=1.0, consensus="sum",
                      density=None, trim_scope="tensor", gamma=None, drop_rate=None, rescale="dare",
                      q=None, seed=0, exclude=()) -> dict:
    """task arithmetic / TIES / DARE / DARE-TIES / breadcrumbs, whole tensors."""
    n = len(models)
    w = weights or [1.0] * n
    names = _float_names(base, exclude)
    deltas = [{k: m[k].float() - base[k].float() for k in names} for m in models]
    keep = [{k: torch.ones_like(d[k], dtype=torch.bool) for k in names} for d in deltas]
    # (1) magnitude trim
    if gamma is not None:  # breadcrumbs band, per tensor
        for i in range(n):
            for k in names:
                a = deltas[i][k].abs().flatten()
                m_top = round(gamma * a.numel())
                lo = kth_largest(a, m_top + keep_count(density, a.numel()))
                hi = kth_largest(a, m_top) if m_top > 0 else math.inf
                keep[i][k] &= (deltas[i][k].abs() >= lo) & (deltas[i][k].abs() < hi)
    elif density is not None and density < 1.0:
        for i in range(n):
            if trim_scope == "global":
                allv = torch.cat([deltas[i][k].abs().flatten() for k in names])
                thr = kth_largest(allv, keep_count(density, allv.numel()))
                for k in names:
                    keep[i][k] &= deltas[i][k].abs() >= thr
            else:
                for k in names:
                    a = deltas[i][k].abs().flatten()
                    keep[i][k] &= deltas[i][k].abs() >= kth_largest(a, keep_count(density, a.numel()))
    # (2) DARE drop + rescale
    scale = [1.0] * n
    if drop_rate is not None:
        thr = drop_threshold(drop_rate)
        for i in range(n):
            for k in names:
                mask = philox_keep_mask(model_key(seed, i, k), 0, deltas[i][k].numel(), thr).reshape(deltas[i][k].shape)
                keep[i][k] &= mask
        scale = [{"dare": 1 / (1 - drop_rate), "darex-q": 1 / (q or 1.0), "none": 1.0}[rescale]] * n
    out = {k: v for k, v in base.items()}
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    for k in names:
        d = [torch.where(keep[i][k], deltas[i][k] * f32(scale[i]), torch.zeros(())) for i in range(n)]
        if consensus == "sum":
            merged = sum(f32(w[i]) * d[i] for i in range(n))
        else:  # TIES: elect the sign of the weighted sum, weighted mean of the agreeing deltas
            s = sum(f32(w[i]) * d[i] for i in range(n))
            pos = s >= 0
            agree = [torch.where(pos, d[i] > 0, d[i] < 0) for i in range(n)]
            num = sum(torch.where(agree[i], f32(w[i]) * d[i], torch.zeros(())) for i in range(n))
            den = sum(torch.where(agree[i], f32(w[i]), torch.zeros(())) for i in range(n))
            merged = torch.where(den != 0, num / torch.where(den != 0, den, torch.ones(())), torch.zeros(()))
        out[k] = base[k].float() + f32(lam) * merged
    return out
