"""Whole-tensor, in-memory references of every pruning rule (the tests hold the streaming path to these).

Straight from docs/dpp.md with stock torch: kthvalue on whole tensors or the
concatenated model, stable sorts per row. Random masks are defined by the
Philox stream of `ops.reference.philox_keep_mask` (DELLA's per-element keep
probabilities are evaluated one distinct threshold at a time with it).
Output = fl(θ0 + v) for the pruned delta v, cast to the base's dtype.
"""
from __future__ import annotations

import re

import torch

from weightops.methods.reference import keep_count, kth_largest
from weightops.ops import drop_threshold, model_key
from weightops.ops.reference import philox_keep_mask


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64).to(torch.float32)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)


def prune(base: dict, ft: dict, rule: str, rate: float, *, q=None, q_map=None, scope=None, epsilon=0.0,
          norms=None, seed: int = 0, keep=None) -> dict:
    names = [k for k, v in base.items() if v.is_floating_point()]
    d = {k: ft[k].float() - base[k].float() for k in names}
    kept = {k for k in names if keep is not None and re.search(keep, k)}
    pruned = [k for k in names if k not in kept]
    v = {k: d[k].clone() for k in kept}
    if rule == "magnitude" and scope == "global":
        allv = torch.cat([d[k].abs().flatten() for k in pruned]) if pruned else torch.zeros(0)
        thr = kth_largest(allv, keep_count(1 - rate, allv.numel()))
    for k in pruned:
        x, n = d[k], d[k].numel()
        if n == 0:
            v[k] = x
            continue
        if rule in ("dare", "darex-q"):
            qq = 1 - rate if rule == "dare" else (q_map or {}).get(k, q)
            m = philox_keep_mask(model_key(seed, 0, k), 0, n, drop_threshold(rate)).reshape(x.shape)
            v[k] = torch.where(m, x * _f32(1 / qq), torch.zeros(()))
        elif rule == "magnitude" and scope in ("tensor", "global"):
            t = thr if scope == "global" else kth_largest(x.abs().flatten(), keep_count(1 - rate, n))
            v[k] = torch.where(x.abs() >= t, x, torch.zeros(()))
        elif rule == "magnitude":  # per row
            r = _rows(x)
            out = torch.zeros_like(r)
            for i in range(r.shape[0]):
                t = kth_largest(r[i].abs(), keep_count(1 - rate, r.shape[1]))
                out[i] = torch.where(r[i].abs() >= t, r[i], torch.zeros(()))
            v[k] = out.reshape(x.shape)
        elif rule == "wanda":
            nr = norms.get(k) if norms else None
            s = _rows(x).abs() * (nr.float().reshape(1, -1) if nr is not None else 1.0)
            if scope == "tensor":
                m = s >= kth_largest(s.flatten(), keep_count(1 - rate, n))
            else:
                m = torch.ones_like(s, dtype=torch.bool)
                drop = int(s.shape[1] * rate)
                for i in range(s.shape[0]):
                    m[i, torch.sort(s[i], stable=True).indices[:drop]] = False
            v[k] = torch.where(m, _rows(x), torch.zeros(())).reshape(x.shape)
        elif rule == "della":
            r = _rows(x)
            cols = r.shape[1]
            rank = torch.sort(r.abs(), dim=1, stable=True).indices.argsort(dim=1).float()
            prob = torch.full_like(r, 1 - rate) if (cols == 1 or epsilon == 0) else \
                (1 - rate - epsilon) + (2 * epsilon) * (rank / (cols - 1))
            thr = torch.round((1 - prob.double()) * (1 << 24)).long()
            keep_m = torch.zeros_like(r, dtype=torch.bool)
            for t in thr.unique().tolist():
                mk = philox_keep_mask(model_key(seed, 0, k), 0, n, int(t)).reshape(r.shape)
                keep_m |= (thr == t) & mk
            v[k] = torch.where(keep_m, r / prob, torch.zeros(())).reshape(x.shape)
        else:
            raise ValueError(rule)
    out = dict(base)
    for k in names:
        out[k] = (base[k].float() + v[k]).to(base[k].dtype)
    return out
