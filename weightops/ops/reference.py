"""Pure-torch reference kernels: this file IS the specification.

Every native kernel must reproduce these results bit for bit, so the order of
float operations here is deliberate: each multiply and each add is a separate
fp32 rounding (never `add(..., alpha=)`, which may be fused), models are folded
in list order, and all scalars arrive already rounded to fp32 (see
`weightops.ops._f32`).
"""
from __future__ import annotations

import torch

# Philox4x32-10 constants (Random123).
M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo(m: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """32x32->64 product of a constant and uint32 values held in int64.

    The full product does not fit a signed int64, so c is split into 16-bit
    halves: every partial product stays below 2**49.
    """
    p_lo = m * (c & 0xFFFF)
    p_hi = m * (c >> 16)
    t = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (t >> 32), t & _U32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 counter words."""
    for r in range(10):
        if r:
            k0, k1 = (k0 + W0) & _U32, (k1 + W1) & _U32
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_keep_mask(key, offset: int, numel: int, drop_threshold: int, device="cpu") -> torch.Tensor:
    """bool[numel]: whether elements offset .. offset+numel-1 survive a drop with this threshold.

    Element e draws a 24-bit uniform v = B·2^16 + L and is kept iff v >= drop_threshold
    (keep probability exactly 1 - thr / 2^24). B is byte e & 15 of the 16 bytes (four
    little-endian words) of Philox counter (e >> 4, 0, 0); L, the low 16 bits of word 0 of
    counter (e, 1, 0), is drawn only when B equals the threshold's high byte (1 in 256
    elements): every other element is decided by B alone, so one Philox call serves 16
    elements instead of 4. A block's result does not depend on where the block starts.
    `drop_threshold` may also be an int64 tensor of per-element thresholds (DELLA).
    """
    if numel == 0:
        return torch.zeros(0, dtype=torch.bool, device=device)
    thr_hi, thr_lo = drop_threshold >> 16, drop_threshold & 0xFFFF
    first, last = offset >> 4, (offset + numel - 1) >> 4
    ctr = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    zero = torch.zeros_like(ctr)
    words = torch.stack(philox4x32_10(ctr & _U32, ctr >> 32, zero, zero, key[0], key[1]), dim=1).reshape(-1, 1)
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=device)
    flat = ((words >> shifts) & 0xFF).reshape(-1)  # byte j of word i at 4i + j: little-endian order
    start = offset & 15
    byte = flat[start:start + numel]
    keep = byte > thr_hi
    tie = (byte == thr_hi).nonzero().reshape(-1)
    if tie.numel():
        e = tie + offset
        one = torch.ones_like(e)
        low = philox4x32_10(e & _U32, e >> 32, one, torch.zeros_like(e), key[0], key[1])[0] & 0xFFFF
        keep[tie] = low >= (thr_lo[tie] if isinstance(thr_lo, torch.Tensor) else thr_lo)
    return keep


def delta_merge(base, models, weights, *, offset=0, keys=None, drop_threshold=0, rescales=None,
                lo=None, hi=None, consensus="sum", lam=1.0, out_dtype=None) -> torch.Tensor:
    b = base.float()
    n = b.numel()
    ds = []
    for i, x in enumerate(models):
        d = x.float() - b
        a = d.abs()
        keep = torch.ones(n, dtype=torch.bool, device=b.device)
        if lo is not None:
            keep &= ~(a < lo[i])
        if hi is not None and hi[i] != float("inf"):
            keep &= a < hi[i]
        if drop_threshold > 0:
            keep &= philox_keep_mask(keys[i], offset, n, drop_threshold, b.device)
        r = 1.0 if rescales is None else rescales[i]
        ds.append(torch.where(keep, d * r, torch.zeros_like(d)))

    if consensus == "sum":
        m = torch.zeros_like(b)
        for w, d in zip(weights, ds):
            m = m + w * d
    elif consensus == "ties":
        s = torch.zeros_like(b)
        for w, d in zip(weights, ds):
            s = s + w * d
        pos = s >= 0
        num = torch.zeros_like(b)
        den = torch.zeros_like(b)
        for w, d in zip(weights, ds):
            agree = torch.where(pos, d > 0, d < 0)
            num = torch.where(agree, num + w * d, num)
            den = torch.where(agree, den + w, den)
        m = torch.where(den != 0, num / den, torch.zeros_like(num))
    else:
        raise ValueError(f"unknown consensus {consensus!r} (expected 'sum' or 'ties')")
    return (b + lam * m).to(out_dtype or base.dtype)


def weighted_sum(xs, weights, out_dtype=None) -> torch.Tensor:
    acc = torch.zeros(xs[0].numel(), dtype=torch.float32, device=xs[0].device)
    for w, x in zip(weights, xs):
        acc = acc + w * x.float()
    return acc.to(out_dtype or xs[0].dtype)


def abs_bits(x, base=None) -> torch.Tensor:
    """|x - base| as fp32 bit patterns in int64: for non-negative floats the
    bit pattern orders like the value, so a radix select over bits is exact."""
    v = x.float() if base is None else x.float() - base.float()
    return v.abs().view(torch.int32).to(torch.int64) & _U32


def abs_histogram(x, base=None, prefix: int = -1) -> torch.Tensor:
    u = abs_bits(x, base)
    if prefix < 0:
        idx = u >> 16
    else:
        idx = u[(u >> 16) == prefix] & 0xFFFF
    return torch.bincount(idx, minlength=65536)
