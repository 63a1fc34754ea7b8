"""Per-layer analytic q for DAREx-q (the paper's Algorithm 3, as vengdeng/DAREx computes it).

For a linear weight δ [rows, n] with signed mean inputs x̄ [n] (and a delta
bias δb, as one more input column of value 1): c_ij = δ_ij·x̄_j,
S1_i = Σj c_ij, S2_i = Σj c_ij², φ(p) = (1 − 2p)/ln((1 − p)/p) and

    f_i(q) = | η(1 − (1 − p)/q)·S1_i + η²φ(p)·S2_i/(4q²) + ln(2/(1 − γ)) |

scanned over q = 1 − p … 0.998 (step 0.001): row i keeps the q of its
smallest f (ties: the larger q), and the scan stops early once `stop_frac`
of the rows have seen f stop decreasing (the reference's outlier guard).
The tensor's q is the mean of its rows' q; its bias takes the same q, and
tensors without statistics take the mean over tensors.

Kept as in the reference: the signed S1 (quirk a), the early stop, the
calibration through the fine-tuned model (d). Fixed: the scan starts at the
first grid point >= 1 − p (the reference's float floor starts at 0.099 for
p = 0.9, below the bound: b); sums in float64, not float16 (c), so no row
overflows to inf and sticks at q = 1 − p.
"""
from __future__ import annotations

import math
import re

import torch

from weightops.errors import WeightopsError

GAMMA = 0.95
ETA = 0.45
STOP_FRAC = 0.8
Q_MAX = 0.998
STEP = 0.001
# Weights that get no q of their own in the reference (they take the mean).
NO_OWN_Q = re.compile(r"lm_head|classifier|LayerNorm|layernorm|norm\.|embed")


def phi(p: float) -> float:
    if not 0 < p < 1:
        raise WeightopsError(f"analytic q needs a drop rate in (0, 1), got {p:g}")
    if abs(p - 0.5) < 1e-9:
        return 0.5  # the limit of (1-2p)/ln((1-p)/p) at p = 1/2
    return (1 - 2 * p) / math.log((1 - p) / p)


def q_grid(p: float, hi: float = Q_MAX, step: float = STEP) -> torch.Tensor:
    first = math.ceil((1 - p) / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    if last < first:
        return torch.tensor([max(1 - p, hi)], dtype=torch.float64)
    return torch.arange(first, last + 1, dtype=torch.float64) * step


def objective(s1: torch.Tensor, s2: torch.Tensor, q: torch.Tensor, p: float, eta: float, gamma: float) -> torch.Tensor:
    """f[i, t] for rows i and grid points q[t] (float64)."""
    s1, s2, q = s1.double()[:, None], s2.double()[:, None], q.double()[None, :]
    return (eta * (1 - (1 - p) / q) * s1 + eta ** 2 * phi(p) * s2 / (4 * q ** 2) + math.log(2 / (1 - gamma))).abs()


def row_q(s1: torch.Tensor, s2: torch.Tensor, p: float, *, eta: float = ETA, gamma: float = GAMMA,
          stop_frac: float = STOP_FRAC, q_max: float = Q_MAX) -> torch.Tensor:
    """q_i per row from the row sums S1, S2 (see the module docstring)."""
    if not 0 < gamma < 1:
        raise WeightopsError(f"--gamma must be in (0, 1), got {gamma:g}")
    if not eta > 0:
        raise WeightopsError(f"--eta must be > 0, got {eta:g}")
    grid = q_grid(p, q_max)
    f = objective(s1, s2, grid, p, eta, gamma)  # [rows, G]
    rows, g = f.shape
    if rows == 0:
        return torch.zeros(0, dtype=torch.float64)
    prev_min = torch.cummin(f, dim=1).values
    # row i is flagged at the first t >= 1 with f[t] >= min(f[:t])
    flag = torch.zeros_like(f, dtype=torch.bool)
    flag[:, 1:] = f[:, 1:] >= prev_min[:, :-1]
    first_flag = torch.where(flag.any(1), flag.float().argmax(1), torch.full((rows,), g))
    counts = torch.bincount(first_flag.clamp(max=g), minlength=g + 1)[:g].cumsum(0)
    hit = (counts.double() / rows >= stop_frac).nonzero()
    t_stop = int(hit[0]) if len(hit) else g - 1
    fs = f[:, :t_stop + 1]
    # argmin with ties to the LARGER q: the last index holding the minimum
    best = fs.min(1, keepdim=True).values
    last = (fs == best).double() * torch.arange(1, t_stop + 2, dtype=torch.float64)
    return grid[last.argmax(1)]


def row_sums(job_read, rows: int, cols: int, xbar: torch.Tensor, bias_delta: torch.Tensor | None,
             rows_per_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S1, S2 of c = δ·x̄ (plus the bias column), reading δ a few rows at a time."""
    x = xbar.double()
    s1 = torch.empty(rows, dtype=torch.float64)
    s2 = torch.empty(rows, dtype=torch.float64)
    for r0 in range(0, rows, rows_per_block):
        r1 = min(rows, r0 + rows_per_block)
        d = job_read(r0 * cols, r1 * cols).double().reshape(r1 - r0, cols)
        s1[r0:r1] = d @ x
        s2[r0:r1] = (d * d) @ (x * x)
    if bias_delta is not None:
        b = bias_delta.double()
        s1 += b
        s2 += b * b
    return s1, s2


def tensor_q_map(base, finetuned, means: dict[str, torch.Tensor], p: float, *, eta: float = ETA,
                 gamma: float = GAMMA, stop_frac: float = STOP_FRAC, q_max: float = Q_MAX,
                 block_size: int = 1 << 22, names=None) -> dict[str, float]:
    """{tensor name: q} for every float tensor of `finetuned` (Checkpoint objects); see the module docstring.

    `means`: weight name -> signed mean input x̄ (from `calibration.collect`)."""
    names = [n for n, i in finetuned.infos.items() if i.is_float and n in base.infos] if names is None else names
    own: dict[str, float] = {}
    for n in names:
        if n not in means or NO_OWN_Q.search(n) or len(finetuned.infos[n].shape) != 2:
            continue
        rows, cols = finetuned.infos[n].shape
        if means[n].numel() != cols:
            raise WeightopsError(f"calibration means of '{n}' have {means[n].numel()} features, the weight {cols}")

        def read(a, b, n=n):
            return finetuned.read(n, a, b).double() - base.read(n, a, b).double()
        bname = n[:-len("weight")] + "bias" if n.endswith("weight") else None
        bias = None
        if bname in finetuned.infos and bname in base.infos:
            bias = read_all(finetuned, bname).double() - read_all(base, bname).double()
        s1, s2 = row_sums(read, rows, cols, means[n], bias, max(1, block_size // max(cols, 1)))
        own[n] = float(row_q(s1, s2, p, eta=eta, gamma=gamma, stop_frac=stop_frac, q_max=q_max).mean())
    if not own:
        raise WeightopsError("analytic q: no linear weight has calibration statistics (check --calib-data and the model)")
    mean_q = sum(own.values()) / len(own)
    out = {}
    for n in names:
        w = n[:-len("bias")] + "weight" if n.endswith("bias") else None
        out[n] = own.get(n, own.get(w, mean_q))
    return out


def read_all(ckpt, name: str) -> torch.Tensor:
    return ckpt.read(name, 0, ckpt.infos[name].numel)
