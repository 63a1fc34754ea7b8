"""Element-wise selections from mergekit: passthrough, NearSwap, Arcee Fusion, RAM and RAM+ (tensor-local).

Each output element depends on the same element of the inputs, plus, for Arcee
Fusion and RAM+, a few per-tensor statistics found in a pass before writing:
- passthrough: θ = scale·θ1 (mergekit: one input; slices stack layers with it);
- nearswap: w = clamp(t / max(|θ0 − θ1|, 1e-6), 0, 1), θ = w·θ1 + (1 − w)·θ0;
- arcee_fusion: importance = |θ1 − θ0|·KL(softmax θ1 ‖ softmax θ0) per row (last axis); keep
  the change where importance ≥ median + 1.5·IQR of the tensor's importances (exact order
  statistics: mergekit samples 1M elements with replacement for larger tensors);
- ram: δᵢ counts where |δᵢ| > ε; θ = θ0 + Σᵢ δᵢ·[|δᵢ| > ε] / max(1, #models counting);
- ramplus_tl: as ram, but a model's deltas that no other model shares are scaled by
  λᵢ = 1 + r·clamp(ρᵢ, 0, α), ρᵢ = (its shared count) / max(its unique count, ε) over the tensor.
"""
from __future__ import annotations

import math

import torch

from weightops import ops
from weightops.errors import WeightopsError
from weightops.methods.base import Method, register


class Passthrough(Method):
    name = "passthrough"
    summary = "copy one model's tensors, optionally scaled (mergekit's passthrough; layer stacking with slices)"
    reference_url = "https://github.com/arcee-ai/mergekit"
    needs_base = False
    min_models = max_models = 1
    uses = ("scale",)

    def _scale(self, p):
        s = p.scale
        return s[0] if isinstance(s, (list, tuple)) else s

    def validate(self, p, n_models):
        s = self._scale(p)
        if s is not None and not math.isfinite(float(s)):
            raise WeightopsError(f"--scale must be finite, got {s}")

    def merge_block(self, job, p, state, start, base, models):
        s = self._scale(p)
        x = models[0].float().reshape(-1)
        return x if s is None else x * torch.tensor(float(s), dtype=torch.float32)


class NearSwap(Method):
    name = "nearswap"
    summary = "take the model's value where it is within t of the base's, interpolate beyond (NearSwap)"
    reference_url = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    min_models = max_models = 1
    uses = ("t",)

    def validate(self, p, n_models):
        if p.t is None or not math.isfinite(p.t):
            raise WeightopsError("nearswap needs a finite --t (the similarity threshold, e.g. 0.0001)")

    def merge_block(self, job, p, state, start, base, models):
        a, b = base.float().reshape(-1), models[0].float().reshape(-1)
        # t / x as torch evaluates mergekit's `t / absdiff` (reciprocal, then times t in fp32): same bits
        w = ((a - b).abs().clamp(min=1e-6).reciprocal() * torch.tensor(p.t, dtype=torch.float32)).clamp(0, 1)
        return w * b + (1 - w) * a


def _rows(job, which=None):
    """(first row, base rows, model rows) over whole rows of the last axis, for row-wise statistics."""
    cols = job.shape[-1] if len(job.shape) else 1
    rows_per = max(1, job.block_size // max(cols, 1))
    n_rows = job.numel // max(cols, 1)
    for r0 in range(0, n_rows, rows_per):
        r1 = min(n_rows, r0 + rows_per)
        b, xs = job.read_block(job, r0 * cols, r1 * cols, which)
        yield r0, b.float().reshape(r1 - r0, cols), [x.float().reshape(r1 - r0, cols) for x in xs]
        for src in [job.base] + [job.models[i] for i in (which or range(len(job.models)))]:
            src.release(job.name, r0 * cols, r1 * cols)


def _kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """mergekit's arcee_fusion KL per row: Σ p·log(p/q), p = softmax(θ1) + 1e-8, q = softmax(θ0) + 1e-8."""
    eps = 1e-8
    p = torch.softmax(p, dim=-1) + eps
    q = torch.softmax(q, dim=-1) + eps
    return torch.sum(p * torch.log(p / q), dim=-1)


class ArceeFusion(Method):
    name = "arcee_fusion"
    summary = "keep the model's changes whose importance |δ|·KL(row) is an upper outlier (median + 1.5·IQR)"
    reference_url = "https://arcee.ai"
    min_models = max_models = 1
    uses = ()

    def prepare(self, job, p, model_state):
        cols = job.shape[-1] if len(job.shape) else 1
        kl = torch.empty(job.numel // max(cols, 1), dtype=torch.float32)
        for r0, b, xs in _rows(job):
            kl[r0:r0 + b.shape[0]] = _kl_rows(xs[0], b)
        if job.numel == 0:
            return kl, math.inf

        def importance():
            for start, base, models in job.blocks():
                d = (models[0].float().reshape(-1) - base.float().reshape(-1)).abs()
                yield d * kl[torch.arange(start, start + d.numel()) // cols], None

        n = job.numel
        qs = [int(q * (n - 1)) for q in (0.25, 0.5, 0.75)]  # sorted-ascending indices, as mergekit
        q1, med, q3 = ops.kth_largest_abs(importance, [n - i for i in qs])
        thr = torch.tensor(med, dtype=torch.float32) + torch.tensor(1.5, dtype=torch.float32) * (
            torch.tensor(q3, dtype=torch.float32) - torch.tensor(q1, dtype=torch.float32))
        return kl, float(thr)

    def merge_block(self, job, p, state, start, base, models):
        kl, thr = state
        cols = job.shape[-1] if len(job.shape) else 1
        b = base.float().reshape(-1)
        d = models[0].float().reshape(-1) - b
        imp = d.abs() * kl[torch.arange(start, start + d.numel()) // cols]
        return b + d * (imp >= torch.tensor(thr, dtype=torch.float32)).float()


class Ram(Method):
    name = "ram"
    summary = "average each delta element over the models whose |δ| > epsilon (Reinforced Agent Merging)"
    reference_url = "https://arxiv.org/abs/2601.13572"
    min_models = 1
    uses = ("epsilon",)
    defaults = {"epsilon": 1e-5}
    plus = False

    def validate(self, p, n_models):
        if isinstance(p.epsilon, (list, tuple)) or p.epsilon is None or not (p.epsilon >= 0):
            raise WeightopsError(f"--epsilon must be one number >= 0, got {p.epsilon}")
        if self.plus:
            if not (math.isfinite(p.r) and math.isfinite(p.alpha)):
                raise WeightopsError("--r and --alpha must be finite")

    @staticmethod
    def _masks(base, models, eps):
        b = base.float().reshape(-1)
        tv = [m.float().reshape(-1) - b for m in models]
        e = torch.tensor(eps, dtype=torch.float32)
        nz = [d.abs() > e for d in tv]
        count = torch.stack(nz).sum(dim=0)
        return b, tv, nz, count

    def prepare(self, job, p, model_state):
        if not self.plus:
            return None
        n = len(job.models)
        shared = [0] * n
        unique = [0] * n
        for _, base, models in job.blocks():
            _, _, nz, count = self._masks(base, models, p.epsilon)
            for i in range(n):
                shared[i] += int((nz[i] & (count > 1)).sum())
                unique[i] += int((nz[i] & (count == 1)).sum())
        lam = []
        for i in range(n):
            rho = torch.tensor(shared[i], dtype=torch.float32) / torch.tensor(max(float(unique[i]), p.epsilon), dtype=torch.float32)
            lam.append(float(1 + torch.tensor(p.r, dtype=torch.float32) * rho.clamp(0, p.alpha)))
        return lam

    def merge_block(self, job, p, state, start, base, models):
        b, tv, nz, count = self._masks(base, models, p.epsilon)
        unique = count == 1
        overlap = count > 1
        c = count.clamp(min=1).float()
        out = torch.zeros_like(b)
        for i, d in enumerate(tv):
            dz = d * nz[i]
            u = dz * unique
            if state is not None:
                u = u * torch.tensor(state[i], dtype=torch.float32)
            out = out + (u + dz * overlap / c)
        return b + out


class RamPlusTL(Ram):
    name = "ramplus_tl"
    summary = "RAM with each model's unshared deltas boosted by 1 + r·clamp(shared/unique, 0, alpha), per tensor"
    uses = ("epsilon", "r", "alpha")
    defaults = {"epsilon": 1e-5, "r": 0.1, "alpha": 0.2}
    plus = True


register(Passthrough())
register(NearSwap())
register(ArceeFusion())
register(Ram())
register(RamPlusTL())
