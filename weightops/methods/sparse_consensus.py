"""mergekit's sparsified task-vector merges not covered by weightops.methods.task_arithmetic:
DELLA, DELLA-linear, breadcrumbs with TIES, and SCE.

All follow mergekit 0.1.5's GeneralizedTaskArithmeticMerge (and sce.py):
1. each model's delta δᵢ = θᵢ − θ0 is sparsified with its own parameters:
   - della (MAGPRUNE): within each row, |δ| ranks (ascending, 0..C−1) give keep probabilities
     (density − ε) + 2ε·rank/(C−1); each element is kept by a counter-based draw
     (Philox, a function of seed, model, tensor and element: mergekit draws from torch's
     global generator);
   - breadcrumbs_ties: keep the band of int(density·n) |δ| below the int(gamma·n) largest
     (the band moves down to the bottom when they overlap, as mergekit);
   - `rescale` (`l1`): the kept deltas are scaled so their L1 norm over the tensor equals δᵢ's;
2. δ'ᵢ·wᵢ are combined: with TIES consensus (della, breadcrumbs_ties) only the deltas whose
   sign agrees with sign(Σ wᵢδ'ᵢ) count; `normalize` divides by Σ wᵢ over the counted models;
   θ = θ0 + λ·merged.
SCE: optionally keep the elements whose delta variance across models is among the top
`select_topk` fraction (of the elements with nonzero variance), elect signs, and average with
weights ∝ the mean squared (kept) delta of each model.

Top-k selections (the exact branch's tie rule plugs in here): `_band` (breadcrumbs_ties: the
band thresholds via ops.kth_largest_abs, ties at a threshold all kept or all dropped) and
`Sce.prepare` (the variance threshold, ties kept); DELLA's per-row ranks (`della_keep_prob`,
a stable sort: ties ranked by position).
"""
from __future__ import annotations

import math

import torch

from weightops import ops
from weightops.errors import WeightopsError
from weightops.methods.base import Method, TensorJob, register
from weightops.ops.reference import philox_keep_mask

F32 = torch.float32


def _per_model(value, n: int, what: str) -> list[float]:
    vals = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(vals) != n:
        raise WeightopsError(f"--{what} has {len(vals)} values for {n} models")
    return [float(v) for v in vals]


def combine(b: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], *, consensus: bool, normalize: bool,
            lam: float) -> torch.Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge after sparsification, in its order of fp32 operations."""
    w = torch.tensor(weights, dtype=F32)
    wd = [d * w[i] for i, d in enumerate(deltas)]
    if consensus:
        s = torch.zeros_like(b)
        for x in wd:
            s = s + x
        majority = torch.where(s >= 0, 1.0, -1.0).to(F32)
        mixed = torch.zeros_like(b)
        div = torch.zeros_like(b)
        for i, x in enumerate(wd):
            m = (x.sign() == majority).to(F32)
            mixed = mixed + x * m
            div = div + w[i] * m
        div = torch.where(div == 0, torch.ones_like(div), div)
    else:
        mixed = torch.zeros_like(b)
        for x in wd:
            mixed = mixed + x
        total = w.sum()
        div = torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
    if normalize:
        mixed = mixed / div
    if lam != 1:
        mixed = mixed * torch.tensor(lam, dtype=F32)
    return b + mixed


class _Sparsified(Method):
    """Shared validation and combination of the sparsify-then-combine methods."""

    consensus = True
    uses = ("weights", "lam", "density", "normalize", "rescale")

    def validate(self, p, n_models):
        if p.weights is None:
            raise WeightopsError(f"{self.name} needs --weights (one per model, as mergekit's `weight`)")
        for d in _per_model(p.density, n_models, "density"):
            if not (0 <= d <= 1):
                raise WeightopsError(f"--density must be in [0, 1], got {d}")
        if p.rescale not in ("l1", "none"):
            raise WeightopsError(f"--rescale must be l1 or none for {self.name}, got {p.rescale}")
        if not math.isfinite(p.lam):
            raise WeightopsError("--lambda must be finite")

    def _l1(self, job: TensorJob, p, keep_of) -> list[float]:
        """mergekit's RescaleNorm.l1 per model: ‖δ‖₁ / ‖kept δ‖₁ over the tensor (1 when either is < 1e-7)."""
        n = len(job.models)
        out = [1.0] * n
        if p.rescale != "l1":
            return out
        for i in range(n):
            total = kept = 0.0
            for start, base, models in job.blocks([i]):
                d = models[0].float().reshape(-1) - base.float().reshape(-1)
                k = keep_of(job, p, i, start, d)
                total += d.abs().sum(dtype=torch.float64).item()
                kept += d.abs()[k].sum(dtype=torch.float64).item()
            out[i] = total / kept if total >= 1e-7 and kept >= 1e-7 else 1.0
        return out

    def merge_block(self, job, p, state, start, base, models):
        b = base.float().reshape(-1)
        ds = []
        for i, x in enumerate(models):
            d = x.float().reshape(-1) - b
            k = self.keep(job, p, state, i, start, d)
            if k is not None:
                d = torch.where(k, d, torch.zeros((), dtype=F32))
                if state["rescale"][i] != 1.0:
                    d = d * torch.tensor(state["rescale"][i], dtype=F32)
            ds.append(d)
        return combine(b, ds, p.weights, consensus=self.consensus, normalize=bool(p.normalize), lam=float(p.lam))


class Della(_Sparsified):
    name = "della"
    summary = "DELLA: magnitude-ranked random drops per row (MAGPRUNE), L1 rescale, TIES sign consensus"
    reference_url = "https://arxiv.org/abs/2406.11617"
    uses = _Sparsified.uses + ("epsilon",)
    defaults = {"lam": 1.0, "density": 1.0, "epsilon": 0.15, "normalize": True, "rescale": "l1"}

    def validate(self, p, n_models):
        super().validate(p, n_models)
        for d, e in zip(_per_model(p.density, n_models, "density"), _per_model(p.epsilon, n_models, "epsilon")):
            if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
                raise WeightopsError(f"--epsilon must keep density ± epsilon inside (0, 1) (mergekit's rule); "
                                     f"density {d:g}, epsilon {e:g}")
        for s in (p.weights,):
            _per_model(s, n_models, "weights")

    def _rows_keep(self, job, p, i, r0, dr) -> torch.Tensor:
        # imported here: weightops.dpp.rules imports weightops.methods (a cycle at module load)
        from weightops.dpp.rules import della_keep_prob
        n = len(job.models)
        d = _per_model(p.density, n, "density")[i]
        e = _per_model(p.epsilon, n, "epsilon")[i]
        if d >= 1:
            return torch.ones_like(dr, dtype=torch.bool)
        if d <= 0:
            return torch.zeros_like(dr, dtype=torch.bool)
        prob = della_keep_prob(dr.abs(), 1.0 - d, e)
        thr = torch.round((1.0 - prob.double()) * (1 << 24)).long().reshape(-1)
        key = ops.model_key(p.seed, i, job.name)
        return philox_keep_mask(key, r0, dr.numel(), thr).reshape(dr.shape)

    def _keep_range(self, job, p, i, start, d, base_rows=None):
        from weightops.dpp.rules import row_len
        cols = max(row_len(job.shape), 1)
        r0, r1 = start // cols, -(-(start + d.numel()) // cols)
        b, (x,) = job.read_block(job, r0 * cols, r1 * cols, [i])
        dr = (x.float() - b.float()).reshape(r1 - r0, cols)
        k = self._rows_keep(job, p, i, r0 * cols, dr).reshape(-1)
        return k[start - r0 * cols: start - r0 * cols + d.numel()]

    def prepare(self, job, p, model_state):
        if len(job.shape) > 2:
            raise WeightopsError(f"{self.name}: '{job.name}' has {len(job.shape)} dimensions; DELLA ranks within rows of 1-D/2-D tensors")
        return {"rescale": self._l1(job, p, self._keep_range)}

    def keep(self, job, p, state, i, start, d):
        if _per_model(p.density, len(job.models), "density")[i] >= 1:
            return None
        return self._keep_range(job, p, i, start, d)


class DellaLinear(Della):
    name = "della_linear"
    summary = "DELLA without sign consensus: magnitude-ranked random drops, L1 rescale, weighted sum"
    consensus = False
    defaults = {"lam": 1.0, "density": 1.0, "epsilon": 0.15, "normalize": False, "rescale": "l1"}


class BreadcrumbsTies(_Sparsified):
    name = "breadcrumbs_ties"
    summary = "breadcrumbs band (drop the largest gamma and the smallest |δ|) with TIES sign consensus"
    reference_url = "https://arxiv.org/abs/2312.06795"
    uses = _Sparsified.uses + ("gamma",)
    defaults = {"lam": 1.0, "density": 1.0, "gamma": 0.01, "normalize": False, "rescale": "none"}

    def validate(self, p, n_models):
        super().validate(p, n_models)
        for g in _per_model(p.gamma, n_models, "gamma"):
            if not (0 <= g <= 1):
                raise WeightopsError(f"--gamma must be in [0, 1], got {g}")

    def _band(self, job, p, i) -> tuple[float, float] | None:
        """(lo, hi): keep lo ≤ |δ| < hi, the int(density·n) |δ| below the top int(gamma·n) (top-k site)."""
        n_models, n = len(job.models), job.numel
        d = _per_model(p.density, n_models, "density")[i]
        g = _per_model(p.gamma, n_models, "gamma")[i]
        if d >= 1:
            return None
        target, n_top = int(d * n), int(g * n)
        n_bot = max(0, n - target - n_top)
        skip = n - n_bot - target  # largest elements above the band
        if target == 0:
            return math.inf, math.inf

        def stream():
            for _, base, models in job.blocks([i]):
                yield models[0], base
        hi, lo = ops.kth_largest_abs(stream, [skip, skip + target])
        return lo, (hi if skip > 0 else math.inf)

    def prepare(self, job, p, model_state):
        bands = [self._band(job, p, i) for i in range(len(job.models))]
        st = {"bands": bands, "rescale": [1.0] * len(bands)}
        st["rescale"] = self._l1(job, p, lambda j, q, i, s, d: self.keep(j, q, st, i, s, d)
                                 if bands[i] is not None else torch.ones_like(d, dtype=torch.bool))
        return st

    def keep(self, job, p, state, i, start, d):
        band = state["bands"][i]
        if band is None:
            return None
        lo, hi = band
        a = d.abs()
        return (a >= torch.tensor(lo, dtype=F32)) & (a < torch.tensor(hi, dtype=F32))


class Sce(Method):
    name = "sce"
    summary = "SCE: select elements by delta variance across models, elect signs, weight models by mean squared delta"
    reference_url = "https://arxiv.org/abs/2408.07990"
    min_models = 1
    uses = ("select_topk",)
    defaults = {"select_topk": 1.0}

    def validate(self, p, n_models):
        if not (0 <= p.select_topk <= 1) or isinstance(p.select_topk, bool):
            raise WeightopsError(f"--select-topk must be in [0, 1], got {p.select_topk}")

    @staticmethod
    def _tv(base, models):
        b = base.float().reshape(-1)
        return b, torch.stack([m.float().reshape(-1) - b for m in models])

    def prepare(self, job, p, model_state):
        k_frac = float(p.select_topk)
        thr = None  # keep elements whose variance >= thr (top-k site; ties at thr all kept)
        if k_frac < 1:
            if k_frac <= 0:
                thr = math.inf
            else:
                def stream():
                    for _, base, models in job.blocks():
                        _, tv = self._tv(base, models)
                        yield torch.var(tv, dim=0, unbiased=False), None
                nonzero = sum(int(torch.count_nonzero(v)) for v, _ in stream())
                k = int(nonzero * k_frac)
                thr = math.inf if k == 0 else ops.kth_largest_abs(stream, [k])[0]
        sums = torch.zeros(len(job.models), dtype=torch.float64)
        for start, base, models in job.blocks():
            _, tv = self._tv(base, models)
            if thr is not None:
                tv = tv * self._mask(tv, thr)
            sums += tv.double().square().sum(dim=1)
        w = (sums / max(job.numel, 1)).to(F32)
        ws = float(w.sum())
        w = torch.full_like(w, 1.0 / len(w)) if abs(ws) < 1e-6 else w / ws
        return thr, w

    @staticmethod
    def _mask(tv, thr):
        if thr == math.inf:
            return torch.zeros(tv.shape[1], dtype=F32)
        return (torch.var(tv, dim=0, unbiased=False) >= torch.tensor(thr, dtype=F32)).to(F32)

    def merge_block(self, job, p, state, start, base, models):
        thr, w = state
        b, tv = self._tv(base, models)
        if thr is not None:
            tv = tv * self._mask(tv, thr)
        s = tv.sum(dim=0)
        majority = torch.where(s >= 0, 1.0, -1.0).to(F32)
        erase = (tv.sign() == majority).to(F32)
        ew = w.unsqueeze(1) * erase
        merged = (tv * ew).sum(dim=0)
        return b + merged / ew.sum(dim=0).clamp(min=1e-6)


register(Della())
register(DellaLinear())
register(BreadcrumbsTies())
register(Sce())
