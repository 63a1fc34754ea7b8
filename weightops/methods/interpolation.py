"""Weight averaging: linear soups, SLERP, Model Stock.

All three are weighted sums of whole models (`weightops.ops.weighted_sum`);
SLERP and Model Stock first make one statistics pass over the tensor (dot
products and norms, accumulated in fp64) to find their coefficients.
"""
from __future__ import annotations

import math

import torch

from weightops import ops
from weightops.errors import WeightopsError
from weightops.methods.base import Method, MergeParams, TensorJob, check_fraction, register


class Linear(Method):
    name = "linear"
    summary = "Σ wi·θi / Σ wi (uniform soup by default; --no-normalize keeps raw weights)"
    reference_url = "https://arxiv.org/abs/2203.05482"
    needs_base = False
    uses = ("weights", "normalize")
    defaults = {"normalize": True}

    def validate(self, p: MergeParams, n_models: int) -> None:
        if p.normalize and p.weights is not None and abs(sum(p.weights)) < 1e-12:
            raise WeightopsError("--weights sum to zero; cannot normalize (pass --no-normalize)")

    def prepare(self, job, p, model_state):
        w = p.weights if p.weights is not None else [1.0] * len(job.models)
        if p.normalize:
            s = sum(w)
            w = [x / s for x in w]
        return w

    def merge_block(self, job, p, state, start, base, models):
        return ops.weighted_sum(models, state, out_dtype=torch.float32)


def _dots(job: TensorJob, with_base: bool) -> torch.Tensor:
    """Gram matrix (fp64) of the models' blocks, or of their deltas from the base."""
    n = len(job.models)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for _, base, models in job.blocks():
        b = base.double() if with_base else None
        vs = torch.stack([(m.double() - b) if with_base else m.double() for m in models])
        gram += vs @ vs.T
    return gram


class Slerp(Method):
    name = "slerp"
    summary = "spherical interpolation between two models, per tensor (linear when nearly parallel)"
    reference_url = "https://en.wikipedia.org/wiki/Slerp"
    needs_base = False
    min_models = max_models = 2
    uses = ("t",)
    defaults = {"t": 0.5}
    parallel_cos = 0.9995
    zero_norm = 1e-8  # mergekit's eps: a vector this short is not normalised

    def validate(self, p, n_models):
        check_fraction("t", p.t)

    def prepare(self, job, p, model_state):
        g = _dots(job, with_base=False)
        n0, n1 = math.sqrt(g[0, 0].item()), math.sqrt(g[1, 1].item())
        t = p.t
        # As mergekit (0.1.x): a (near-)zero tensor is left unnormalised, so its cosine with the other is ~0 and
        # the result is sin((1-t)π/2)·θ0 + sin(tπ/2)·θ1, not the linear (1-t)·θ0 + t·θ1.
        d0 = n0 if n0 > self.zero_norm else 1.0
        d1 = n1 if n1 > self.zero_norm else 1.0
        cos = max(-1.0, min(1.0, g[0, 1].item() / (d0 * d1)))
        if abs(cos) > self.parallel_cos:
            return [1 - t, t]
        theta = math.acos(cos)
        s = math.sin(theta)
        return [math.sin((1 - t) * theta) / s, math.sin(t * theta) / s]

    def merge_block(self, job, p, state, start, base, models):
        return ops.weighted_sum(models, state, out_dtype=torch.float32)


class ModelStock(Method):
    name = "model_stock"
    summary = "t·mean(θi) + (1−t)·θ0 with t = N·cos/(1+(N−1)·cos) from the deltas' mean pairwise cosine"
    reference_url = "https://arxiv.org/abs/2403.19522"
    min_models = 2
    uses = ("filter_wise",)
    defaults = {"filter_wise": False}

    @staticmethod
    def _t(g: torch.Tensor) -> torch.Tensor:
        """t per vector from [V, n, n] delta Gram matrices, as mergekit computes it (norm products clamped
        at 1e-6, cosines clamped to [-1, 1]; t = 0 where 1 + (N−1)·cos is within 1e-6 of 0)."""
        n = g.shape[1]
        norms = g.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()
        cos = [(g[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1, 1)
               for i in range(n) for j in range(i + 1, n)]
        c = torch.stack(cos).mean(dim=0)
        den = 1 + (n - 1) * c
        singular = den.abs() < 1e-6
        return torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))

    def prepare(self, job, p, model_state):
        from weightops.methods.spherical import FLAT, ROWS, grams

        n = len(job.models)
        if not p.filter_wise:
            t = self._t(_dots(job, with_base=True).unsqueeze(0))[0].item()
            return [1 - t] + [t / n] * n
        t = self._t(grams(job, ROWS, True))
        return ROWS if len(job.shape) >= 2 else FLAT, (t / n).unsqueeze(1).expand(-1, n), 1 - t

    def merge_block(self, job, p, state, start, base, models):
        if isinstance(state, list):
            return ops.weighted_sum([base] + models, state, out_dtype=torch.float32)
        from weightops.methods.spherical import combine, vector_ids

        mode, coef, base_coef = state
        return combine(coef, vector_ids(job.shape, mode, start, start + base.numel()), base, models, base_coef)


register(Linear())
register(Slerp())
register(ModelStock())
