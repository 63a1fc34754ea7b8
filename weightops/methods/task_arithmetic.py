"""The task-vector family: task arithmetic, TIES, DARE, DARE-TIES, breadcrumbs.

One class, configured per paper (as mergekit's GeneralizedTaskArithmeticMerge):
for each model δi = θi − θ0 is (1) trimmed by magnitude (keep the top
`density` of |δi|, or for breadcrumbs the band below the top `gamma`), (2)
randomly dropped with probability p and rescaled (DARE), then (3) combined by
a weighted sum or TIES sign election with disjoint mean, and θ = θ0 + λ·merged.
All of it is one fused op, `weightops.ops.delta_merge`.

Conventions (see shared/methods.md):
- `--drop-rate p` is the DROP probability (DARE paper, MergeLM); mergekit's
  `density` for dare_* is the KEEP probability 1 − p.
- The DARE mask of element j of tensor T of model i is a pure function of
  (seed, i, T, j) (counter-based Philox), so results do not depend on block
  size, thread count or tensor order.
- Thresholds are exact k-th largest |δ| with k = round(fraction · n) (at least
  1 when the fraction is > 0); ties at the threshold are all kept.
- TIES trims over the whole model by default (`--trim-scope global`, the
  paper's code); `tensor` trims each tensor separately (mergekit).
"""
from __future__ import annotations

import math

import torch

from weightops import ops
from weightops.errors import WeightopsError
from weightops.methods.base import Method, MergeParams, TensorJob, check_fraction, register

RESCALES = ("dare", "darex-q", "l1", "none")


def keep_count(fraction: float, n: int) -> int:
    k = round(fraction * n)
    return max(k, 1) if fraction > 0 and n > 0 else k


class DeltaMerge(Method):
    def __init__(self, name, summary, url, *, consensus, trim=None, dare=False, uses=(), defaults=None):
        self.name, self.summary, self.reference_url = name, summary, url
        self.consensus, self.trim, self.dare = consensus, trim, dare
        self.uses = ("weights", "lam") + tuple(uses)
        self.defaults = {"lam": 1.0, **(defaults or {})}

    def validate(self, p: MergeParams, n_models: int) -> None:
        check_fraction("density", p.density)
        check_fraction("gamma", p.gamma)
        if self.trim == "band" and p.density is not None and p.gamma is not None and p.density + p.gamma > 1:
            raise WeightopsError("--density plus --gamma must not exceed 1")
        if self.dare:
            check_fraction("drop_rate", p.drop_rate, 0.0, 1.0)
            if p.drop_rate >= 1.0:
                raise WeightopsError("--drop-rate must be below 1 (1 drops every delta)")
            if p.rescale not in RESCALES:
                raise WeightopsError(f"--rescale must be one of {', '.join(RESCALES)}, got {p.rescale}")
            if p.rescale == "darex-q":
                # q: one divisor for every model, or one per model (e.g. chosen by `--q auto`)
                qs = p.q if isinstance(p.q, (list, tuple)) else [p.q]
                if isinstance(p.q, (list, tuple)) and len(qs) != n_models:
                    raise WeightopsError(f"--q has {len(qs)} values for {n_models} models")
                if any(q is None or not (1 - p.drop_rate - 1e-12 <= q <= 1) for q in qs):
                    raise WeightopsError(f"--rescale darex-q needs --q in [1 - drop_rate, 1] = [{1 - p.drop_rate:g}, 1]")
            elif p.q is not None:
                raise WeightopsError("--q is only used with --rescale darex-q")
        if p.trim_scope not in (None, "global", "tensor"):
            raise WeightopsError(f"--trim-scope must be global or tensor, got {p.trim_scope}")

    def _weights(self, p: MergeParams, n: int) -> list[float]:
        return p.weights if p.weights is not None else [1.0] * n

    def _trims(self, p: MergeParams) -> bool:
        return self.trim is not None and p.density is not None and p.density < 1.0 or self.trim == "band"

    # -- statistics passes ------------------------------------------------------------
    def prepare_model(self, jobs, p):
        if not (self.trim == "magnitude" and self._trims(p) and p.trim_scope == "global"):
            return None
        n_total = sum(j.numel for j in jobs)
        k = keep_count(p.density, n_total)
        n_models = len(jobs[0].models) if jobs else 0
        thresholds = []
        for i in range(n_models):
            def stream(i=i):
                for job in jobs:
                    for _, base, models in job.blocks([i]):
                        yield models[0], base
            thresholds.append(ops.kth_largest_abs(stream, [k])[0])
        return thresholds

    def prepare(self, job: TensorJob, p: MergeParams, model_state):
        n_models, n = len(job.models), job.numel
        lo = hi = None
        if self.trim == "magnitude" and self._trims(p):
            if model_state is not None:
                lo = list(model_state)
            else:
                k = keep_count(p.density, n)
                lo = [self._kth(job, i, [k])[0] for i in range(n_models)]
            hi = [math.inf] * n_models
        elif self.trim == "band":
            m = round(p.gamma * n)
            k = keep_count(p.density, n)
            lo, hi = [], []
            for i in range(n_models):
                t_hi, t_lo = self._kth(job, i, [m, m + k])
                lo.append(t_lo)
                hi.append(t_hi if m > 0 else math.inf)
        state = {"lo": lo, "hi": hi, "keys": None, "thr": 0, "rescales": [1.0] * n_models}
        if self.dare:
            state["keys"] = [ops.model_key(p.seed, i, job.name) for i in range(n_models)]
            state["thr"] = ops.drop_threshold(p.drop_rate)
            if p.rescale == "dare":
                state["rescales"] = [1.0 / (1.0 - p.drop_rate)] * n_models
            elif p.rescale == "darex-q":
                qs = p.q if isinstance(p.q, (list, tuple)) else [p.q] * n_models
                state["rescales"] = [1.0 / q for q in qs]
            elif p.rescale == "l1":
                state["rescales"] = self._l1_rescales(job, state)
        return state

    @staticmethod
    def _kth(job: TensorJob, i: int, ks: list[int]) -> list[float]:
        def stream():
            for _, base, models in job.blocks([i]):
                yield models[0], base
        return ops.kth_largest_abs(stream, ks)

    @staticmethod
    def _l1_rescales(job: TensorJob, state) -> list[float]:
        """mergekit's RescaleNorm.l1: ‖δ‖₁ / ‖m⊙δ‖₁ per model and tensor (1 when either is ~0)."""
        out = []
        for i in range(len(job.models)):
            total = kept = 0.0
            for start, base, models in job.blocks([i]):
                a = (models[0].float() - base.float()).abs()
                mask = ops.philox_keep_mask(state["keys"][i], start, a.numel(), state["thr"])
                total += a.sum(dtype=torch.float64).item()
                kept += a[mask].sum(dtype=torch.float64).item()
            out.append(total / kept if total >= 1e-7 and kept >= 1e-7 else 1.0)
        return out

    def merge_block(self, job, p, state, start, base, models):
        return ops.delta_merge(
            base, models, self._weights(p, len(models)), offset=start, keys=state["keys"],
            drop_threshold=state["thr"], rescales=state["rescales"], lo=state["lo"], hi=state["hi"],
            consensus=self.consensus, lam=p.lam, out_dtype=torch.float32,
        )


register(DeltaMerge(
    "task_arithmetic", "θ0 + λ·Σ wi·δi (negative weights subtract a task)",
    "https://arxiv.org/abs/2212.04089", consensus="sum",
))
register(DeltaMerge(
    "ties", "trim to the top-density |δ|, elect signs, disjoint mean (TIES-Merging)",
    "https://arxiv.org/abs/2306.01708", consensus="ties", trim="magnitude",
    uses=("density", "trim_scope"), defaults={"density": 0.2, "trim_scope": "global"},
))
register(DeltaMerge(
    "dare_linear", "drop each δ element with probability p, rescale, task arithmetic (DARE)",
    "https://arxiv.org/abs/2311.03099", consensus="sum", dare=True,
    uses=("drop_rate", "rescale", "q"), defaults={"drop_rate": 0.9, "rescale": "dare"},
))
register(DeltaMerge(
    "dare_ties", "DARE drop and rescale, then TIES sign election and disjoint mean (optional magnitude trim)",
    "https://arxiv.org/abs/2311.03099", consensus="ties", trim="magnitude", dare=True,
    uses=("drop_rate", "rescale", "q", "density", "trim_scope"),
    defaults={"drop_rate": 0.9, "rescale": "dare", "trim_scope": "tensor"},
))
register(DeltaMerge(
    "breadcrumbs", "keep the band of |δ| below the top gamma and above the bottom (Model Breadcrumbs)",
    "https://arxiv.org/abs/2312.06795", consensus="sum", trim="band",
    uses=("density", "gamma"), defaults={"density": 0.9, "gamma": 0.01},
))
