"""Delta-parameter pruning (DPP) of one fine-tuned model against its base.

θ = θ0 + prune(δ), δ = θft − θ0, one `Method` per pruning rule, all run by
`weightops.engine.run_streaming` (blocks, numerics checks, atomic output,
manifest). `rate` p is always the fraction of delta elements DROPPED.

- dare / darex-q: keep each element with probability 1 − p (the Philox mask of
  `weightops.ops`, model index 0, so `prune --method dare` gives the same bytes
  as `merge --method dare_linear` with one model), rescale kept deltas by
  1/(1 − p) (DARE) or 1/q (DAREx-q; q global or one per tensor).
- magnitude: keep the top round((1 − p)·n) |δ| per tensor (MergeLM, mergekit),
  over the whole model (`global`) or per row; ties at the threshold are kept.
- wanda: score |δ_ij|·‖X_j‖₂, drop the int(p·cols) lowest scores of each row
  (WANDA's comparison group and stable-sort tie order), or per tensor.
- della: MAGPRUNE: within each row, keep probability rises linearly with the
  |δ| rank from (1 − p) − ε to (1 − p) + ε; kept values are rescaled by
  1/keep-probability (the DELLA paper; mergekit now rescales by the L1 norm).

Row-wise rules read the whole rows a block touches (at most one extra row at
each end), so results never depend on the block size.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from weightops import ops
from weightops.errors import WeightopsError
from weightops.methods.base import Method, TensorJob
from weightops.methods.task_arithmetic import keep_count
from weightops.ops.reference import philox_keep_mask

METHODS = ("dare", "darex-q", "magnitude", "wanda", "della")
SCOPES = {"magnitude": ("tensor", "global", "row"), "wanda": ("row", "tensor")}


@dataclass
class PruneParams:
    rate: float
    seed: int = 0
    q: float | None = None  # DAREx-q global divisor
    q_map: dict[str, float] | None = None  # DAREx-q per-tensor divisors (analytic q); others take `q`
    scope: str | None = None  # magnitude/wanda comparison group
    epsilon: float | None = None  # della
    norms: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # wanda: ‖X_j‖₂ per tensor name
    keep: str | None = None  # regex: tensors copied from the fine-tuned model unpruned
    model_index: int = 0  # Philox key index: i scores exactly the mask `merge` draws for its i-th model

    def as_dict(self) -> dict:
        d = {"rate": self.rate, "seed": self.seed}
        for k in ("q", "scope", "epsilon", "keep"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.q_map:
            d["q_map"] = {k: round(v, 6) for k, v in self.q_map.items()}
        return d


def check_rate(rate) -> float:
    if rate is None or not (0.0 <= float(rate) < 1.0) or math.isnan(float(rate)):
        raise WeightopsError(f"--rate (drop rate) must be in [0, 1), got {rate}")
    return float(rate)


def check_q(q: float, rate: float, what: str = "--q") -> float:
    if not (1.0 - rate - 1e-12 <= q <= 1.0):
        raise WeightopsError(f"{what} must be in [1 - rate, 1] = [{1 - rate:g}, 1] for DAREx-q, got {q:g}")
    return q


def della_epsilon(rate: float, epsilon: float | None) -> float:
    k = 1.0 - rate
    eps = min(0.1, k / 2, (1 - k) / 2) if epsilon is None else float(epsilon)
    if eps < 0 or (eps > 0 and (k - eps <= 0 or k + eps > 1)):
        raise WeightopsError(f"--epsilon must keep (1 - rate) ± epsilon within (0, 1]; rate {rate:g} allows "
                             f"at most {min(k, 1 - k):g}, got {eps:g}")
    return eps


def row_len(shape) -> int:
    """Elements per row: the last dimension (a 1-D tensor or scalar is one row)."""
    return int(shape[-1]) if len(shape) else 1


def rows_around(job: TensorJob, start: int, stop: int):
    """(first element, base rows, fine-tuned rows) covering [start, stop), fp32, [rows, cols]."""
    cols = max(row_len(job.shape), 1)
    r0, r1 = start // cols, -(-stop // cols)
    b, (x,) = job.read_block(job, r0 * cols, r1 * cols, None)
    return r0 * cols, b.float().reshape(r1 - r0, cols), x.float().reshape(r1 - r0, cols)


def wanda_row_keep(score: torch.Tensor, rate: float) -> torch.Tensor:
    """WANDA's rule on [rows, cols] scores: drop the int(cols·p) lowest per row (stable sort)."""
    n_drop = int(score.shape[1] * rate)
    keep = torch.ones_like(score, dtype=torch.bool)
    if n_drop:
        idx = torch.sort(score, dim=1, stable=True).indices[:, :n_drop]
        keep.scatter_(1, idx, False)
    return keep


def della_keep_prob(absd: torch.Tensor, rate: float, eps: float) -> torch.Tensor:
    """[rows, cols] keep probabilities: (1-p) - ε + 2ε·rank/(cols-1), rank of |δ| ascending within a row."""
    cols = absd.shape[1]
    k = 1.0 - rate
    if cols == 1 or eps == 0:
        return torch.full_like(absd, k)
    order = torch.sort(absd, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(cols).expand_as(order).contiguous())
    return (k - eps) + (2 * eps) * (rank.float() / (cols - 1))


class Prune(Method):
    """One class, configured per rule; `params` is a PruneParams."""

    needs_base = True
    min_models = max_models = 1

    def __init__(self, rule: str):
        self.rule = rule
        self.name = f"prune-{rule}"

    def _kept(self, job: TensorJob, p: PruneParams) -> bool:
        return p.keep is not None and re.search(p.keep, job.name) is not None

    def _score_stream(self, job: TensorJob, p: PruneParams):
        """(|δ|·‖X‖ or |δ|, None) blocks for kth_largest_abs."""
        n = p.norms.get(job.name) if (self.rule == "wanda" and p.norms) else None
        n = n.float() if n is not None else None
        cols = max(row_len(job.shape), 1)
        for start, base, (x,) in job.blocks():
            d = (x.float() - base.float()).abs()
            if n is not None:
                d = d * n[(torch.arange(start, start + d.numel()) % cols)]
            yield d, None

    def prepare_model(self, jobs, p: PruneParams):
        if self.rule != "magnitude" or p.scope != "global":
            return None
        jobs = [j for j in jobs if not self._kept(j, p)]
        k = keep_count(1.0 - p.rate, sum(j.numel for j in jobs))

        def stream():
            for j in jobs:
                for _, base, (x,) in j.blocks():
                    yield x, base
        return ops.kth_largest_abs(stream, [k])[0]

    def prepare(self, job: TensorJob, p: PruneParams, model_state):
        st = {"kept": self._kept(job, p)}
        if st["kept"]:
            return st
        if self.rule in ("dare", "darex-q"):
            q = 1.0 - p.rate if self.rule == "dare" else (p.q_map or {}).get(job.name, p.q)
            st.update(key=ops.model_key(p.seed, p.model_index, job.name), thr=ops.drop_threshold(p.rate), rescale=1.0 / q, q=q)
        elif self.rule == "magnitude" and p.scope in ("tensor", "global"):
            st["lo"] = model_state if p.scope == "global" else \
                self._kth(job, p, keep_count(1.0 - p.rate, job.numel))
        elif self.rule == "wanda":
            norms = (p.norms or {}).get(job.name)
            if norms is not None and (len(job.shape) != 2 or norms.numel() != job.shape[1]):
                raise WeightopsError(f"calibration norms of '{job.name}' have {norms.numel()} features but the "
                                     f"tensor is {list(job.shape)}; was the calibration run on this model?")
            st["norms"] = norms.float() if norms is not None else None
            if p.scope == "tensor":
                st["thr"] = self._kth(job, p, keep_count(1.0 - p.rate, job.numel))
        elif self.rule == "della":
            st["key"] = ops.model_key(p.seed, p.model_index, job.name)
        return st

    def _kth(self, job, p, k) -> float:
        return ops.kth_largest_abs(lambda: self._score_stream(job, p), [k])[0]

    def merge_block(self, job, p: PruneParams, st, start, base, models):
        x = models[0]
        if not st["kept"] and self.rule in ("dare", "darex-q"):
            return ops.delta_merge(base, [x], [1.0], offset=start, keys=[st["key"]], drop_threshold=st["thr"],
                                   rescales=[st["rescale"]], out_dtype=torch.float32)
        if not st["kept"] and "lo" in st:
            return ops.delta_merge(base, [x], [1.0], offset=start, lo=[st["lo"]], hi=[math.inf], out_dtype=torch.float32)
        return base.float().reshape(-1) + self.delta_block(job, p, st, start, base, x)

    def delta_block(self, job, p: PruneParams, st, start, base, x) -> torch.Tensor:
        """The pruned delta v of elements [start, start + len) in fp32: the output is exactly fl(θ0 + v)
        (what `ops.delta_merge` computes for the same mask and rescale), so a sparse delta holding v
        restores the pruned model bit for bit."""
        b = base.float().reshape(-1)
        d = x.float().reshape(-1) - b
        if st["kept"]:
            return d
        zero = torch.zeros((), dtype=torch.float32)
        if self.rule in ("dare", "darex-q"):
            keep = ops.philox_keep_mask(st["key"], start, d.numel(), st["thr"])
            return torch.where(keep, d * _f32(st["rescale"]), zero)
        if "lo" in st:
            return torch.where(~(d.abs() < _f32(st["lo"])), d * 1.0, zero)
        if self.rule == "wanda" and p.scope == "tensor":
            s = d.abs()
            if st["norms"] is not None:
                s = s * st["norms"][torch.arange(start, start + d.numel()) % job.shape[1]]
            return torch.where(s >= st["thr"], d, zero)
        # row-wise rules: magnitude/row, wanda/row, della
        r0, b2, x2 = rows_around(job, start, start + d.numel())
        dr = x2 - b2
        if self.rule == "della":
            prob = della_keep_prob(dr.abs(), p.rate, della_epsilon(p.rate, p.epsilon))
            thr = torch.round((1.0 - prob.double()) * (1 << 24)).long().reshape(-1)
            keep = philox_keep_mask(st["key"], r0, dr.numel(), thr).reshape(dr.shape)
            v = torch.where(keep, dr / prob, zero)
        else:
            score = dr.abs()
            if self.rule == "wanda" and st["norms"] is not None:
                score = score * st["norms"].reshape(1, -1)
            keep = wanda_row_keep(score, p.rate) if self.rule == "wanda" else _magnitude_row_keep(score, p.rate)
            v = torch.where(keep, dr, zero)
        return v.reshape(-1)[start - r0:start - r0 + d.numel()]


def _f32(v: float) -> float:
    return ops._f32([v])[0]


def _magnitude_row_keep(a: torch.Tensor, rate: float) -> torch.Tensor:
    """Per row: keep |δ| >= the k-th largest of the row, k = keep_count(1-p, cols) (ties kept)."""
    k = keep_count(1.0 - rate, a.shape[1])
    if k >= a.shape[1]:
        return torch.ones_like(a, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(a, dtype=torch.bool)
    thr = torch.topk(a, k, dim=1).values[:, -1:]
    return a >= thr


RULES = {r: Prune(r) for r in METHODS}
