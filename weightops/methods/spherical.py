"""Spherical merges from mergekit: NuSLERP, Multi-SLERP, Karcher mean; Model Stock per row.

Each result is a linear combination of the inputs (or of their deltas from the
base) whose coefficients depend only on dot products. So every method is one
statistics pass that accumulates the inputs' Gram matrix in fp64 (per vector:
the whole tensor, or each row or column), the method's iteration on those
small matrices, then one pass writing Σ cᵢ·xᵢ block by block. mergekit does
the same arithmetic on whole fp32 tensors: results agree to fp32 rounding
(benchmarks/mergekit_parity.py).
"""
from __future__ import annotations

import math

import torch

from weightops.errors import WeightopsError
from weightops.methods.base import Method, TensorJob, register

# How a tensor splits into the vectors a method treats separately.
FLAT, ROWS, COLUMNS = "flat", "rows", "columns"  # whole tensor | along the last axis | along the first axis


def vector_ids(shape: tuple, mode: str, start: int, stop: int) -> torch.Tensor | None:
    """Vector index of flat elements [start, stop) (None: one vector)."""
    if mode == FLAT or len(shape) < 2:
        return None
    idx = torch.arange(start, stop, dtype=torch.int64)
    if mode == ROWS:
        return idx // shape[-1]
    return idx % (math.prod(shape) // shape[0])  # COLUMNS: position within a slice along axis 0


def n_vectors(shape: tuple, mode: str) -> int:
    if mode == FLAT or len(shape) < 2:
        return 1
    return math.prod(shape) // shape[-1] if mode == ROWS else math.prod(shape) // shape[0]


def grams(job: TensorJob, mode: str, with_base: bool, which: list[int] | None = None) -> torch.Tensor:
    """[V, n, n] fp64 Gram matrices of the models' vectors (or of their deltas from the base)."""
    idx = list(range(len(job.models))) if which is None else which
    n, V = len(idx), n_vectors(job.shape, mode)
    g = torch.zeros(V, n, n, dtype=torch.float64)
    for start, base, models in job.blocks(idx):
        b = base.double().reshape(-1) if with_base else None
        vs = torch.stack([(m.double().reshape(-1) - b) if with_base else m.double().reshape(-1) for m in models])
        ids = vector_ids(job.shape, mode, start, start + vs.shape[1])
        if ids is None:
            g[0] += vs @ vs.T
        else:
            outer = vs.unsqueeze(0) * vs.unsqueeze(1)  # [n, n, block]
            g.index_add_(0, ids, outer.permute(2, 0, 1))
    return g


def combine(coef: torch.Tensor, ids, base: torch.Tensor | None, models: list[torch.Tensor], base_coef=None) -> torch.Tensor:
    """Σ coef[v, i]·xᵢ (+ base·base_coef[v]) for each element's vector v, in fp32."""
    flat = [m.float().reshape(-1) for m in models]
    c = coef.to(torch.float32)
    if ids is None:
        out = torch.zeros_like(flat[0])
        for i, x in enumerate(flat):
            out += c[0, i] * x
        if base is not None:
            out += (base_coef[0] if base_coef is not None else 1.0) * base.float().reshape(-1)
        return out
    cs = c[ids]  # [block, n]
    out = torch.zeros_like(flat[0])
    for i, x in enumerate(flat):
        out += cs[:, i] * x
    if base is not None:
        out += (base_coef.to(torch.float32)[ids] if base_coef is not None else 1.0) * base.float().reshape(-1)
    return out


class NuSlerp(Method):
    name = "nuslerp"
    summary = "SLERP of two models (or of their deltas from an optional base) by weight ratio, whole tensors or per row/column"
    reference_url = "https://github.com/arcee-ai/mergekit"
    needs_base = False
    min_models = max_models = 2
    uses = ("weights", "nuslerp_row_wise", "nuslerp_flatten")
    defaults = {"nuslerp_row_wise": False, "nuslerp_flatten": True}

    def validate(self, p, n_models):
        if p.weights is None:
            raise WeightopsError("nuslerp needs --weights (two values; t = w2 / (w1 + w2))")

    def _mode(self, p):
        return FLAT if p.nuslerp_flatten else (COLUMNS if p.nuslerp_row_wise else ROWS)

    def prepare(self, job, p, model_state):
        w0, w1 = p.weights
        total = w0 + w1
        t = 0.5 if abs(total) < 1e-6 else w1 / total
        mode = self._mode(p)
        g = grams(job, mode, job.base is not None)
        n0 = g[:, 0, 0].sqrt().clamp(min=1e-7)
        n1 = g[:, 1, 1].sqrt().clamp(min=1e-7)
        cos = (g[:, 0, 1] / (n0 * n1)).clamp(-1, 1)
        colinear = (1 - cos * cos) <= 1e-16
        theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
        s = torch.sin(theta)
        c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / s)
        c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / s)
        return mode, torch.stack([c0, c1], dim=1)

    def merge_block(self, job, p, state, start, base, models):
        mode, coef = state
        ids = vector_ids(job.shape, mode, start, start + models[0].numel())
        if base is None or base.numel() == 0:
            return combine(coef, ids, None, models)
        b = base.float().reshape(-1)
        return combine(coef, ids, None, [m.float().reshape(-1) - b for m in models]) + b


class MultiSlerp(Method):
    name = "multislerp"
    summary = "barycentric SLERP of any number of models (or deltas from an optional base) on the hypersphere"
    reference_url = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    needs_base = False
    min_models = 1
    uses = ("weights", "normalize", "eps")
    defaults = {"normalize": True, "eps": 1e-8}

    def validate(self, p, n_models):
        if p.weights is None:
            raise WeightopsError("multislerp needs --weights (one per model)")
        if p.normalize and n_models > 1 and sum(p.weights) == 0:
            raise WeightopsError("--weights sum to zero; cannot normalize (pass --no-normalize)")

    def prepare(self, job, p, model_state):
        n = len(job.models)
        if n == 1:
            return None
        with_base = job.base is not None
        G = grams(job, FLAT, with_base)[0]
        w = torch.tensor(p.weights, dtype=torch.float64)
        if p.normalize:
            w = w / w.sum()
        eps = float(p.eps)
        norms = G.diagonal().clamp(min=0).sqrt()
        a = 1.0 / (norms + eps)  # unit_i = a_i·x_i
        m = w * a  # mean = Σ m_i x_i
        mean_norm = math.sqrt(max(float(m @ G @ m), 0.0))
        if mean_norm < eps:
            if n == 2:
                return w.tolist()  # mergekit: linear interpolation
            raise WeightopsError(f"multislerp: the weighted mean of the inputs of '{job.name}' is zero (antipodal inputs "
                                 "with balancing weights); use other weights")
        m = m / mean_norm
        Gm = G @ m
        dots = a * Gm  # unit_i · mean
        tau = w * a - (w * dots).sum() * m  # Σ w_i (unit_i − dot_i·mean)
        tn = math.sqrt(max(float(tau @ G @ tau), 0.0)) + eps
        coef = math.cos(tn) * m + (math.sin(tn) / tn) * tau
        avg_norm = float((norms * w).sum())
        return (coef * avg_norm).tolist()

    def merge_block(self, job, p, state, start, base, models):
        if state is None:
            return models[0].float().reshape(-1)
        c = torch.tensor([state], dtype=torch.float64)
        if base is None or base.numel() == 0:
            return combine(c, None, None, models)
        b = base.float().reshape(-1)
        return combine(c, None, None, [m.float().reshape(-1) - b for m in models]) + b


def karcher_coefficients(G: torch.Tensor, max_iter: int, tol: float) -> list[float]:
    """mergekit's karcher_merge_tensors on the Gram matrix G of the inputs: the weighted (1/n) Karcher mean
    on the unit sphere, scaled by the mean norm, as coefficients of the inputs."""
    n = G.shape[0]
    norms = G.diagonal().clamp(min=0).sqrt()
    valid = [i for i in range(n) if norms[i].item() > tol]
    if not valid:
        return [0.0] * n
    alpha = 1.0 / len(valid)
    nv = norms[valid]
    U = G[valid][:, valid] / (nv.unsqueeze(0) * nv.unsqueeze(1))  # Gram of the unit vectors
    k = len(valid)

    def norm(c):
        return math.sqrt(max(float(c @ U @ c), 0.0))

    m = torch.full((k,), alpha, dtype=torch.float64)
    mn = norm(m)
    m = torch.eye(k, dtype=torch.float64)[0] if mn < tol else m / mn
    for _ in range(max_iter):
        tangent = torch.zeros(k, dtype=torch.float64)
        Um = U @ m
        for i in range(k):
            dot = max(-1.0, min(1.0, float(Um[i])))
            theta = math.acos(dot)
            if theta < tol:
                continue
            e = torch.zeros(k, dtype=torch.float64)
            e[i] = 1.0
            tangent += alpha * (theta / math.sin(theta)) * (e - dot * m)
        tn = norm(tangent)
        if tn < tol:
            break
        m = math.cos(tn) * m + math.sin(tn) * (tangent / tn)
        un = norm(m)
        if un > tol:
            m = m / un
    scale = float(norms.sum()) / n  # Σ (1/n)·‖x_i‖ over every input
    out = [0.0] * n
    for j, i in enumerate(valid):
        out[i] = scale * float(m[j]) / float(norms[i])
    return out


class Karcher(Method):
    name = "karcher"
    summary = "Karcher (Riemannian) mean of the models on the hypersphere, scaled by their mean norm"
    reference_url = "https://arxiv.org/abs/2603.04972"
    needs_base = False
    min_models = 1
    uses = ("max_iter", "tol")
    defaults = {"max_iter": 10, "tol": 1e-5}

    def validate(self, p, n_models):
        if int(p.max_iter) < 0 or not (p.tol >= 0 and math.isfinite(p.tol)):
            raise WeightopsError("--max-iter must be >= 0 and --tol finite and >= 0")

    def prepare(self, job, p, model_state):
        if len(job.models) == 1:
            return [1.0]
        return karcher_coefficients(grams(job, FLAT, False)[0], int(p.max_iter), float(p.tol))

    def merge_block(self, job, p, state, start, base, models):
        return combine(torch.tensor([state], dtype=torch.float64), None, None, models)


register(NuSlerp())
register(MultiSlerp())
register(Karcher())
