"""Exact k-th largest |x - base| over a stream of blocks, by two-pass radix select.

|v| as fp32 bits orders like |v| itself, so the answer is found 16 bits at a
time: pass 1 histograms the high 16 bits of every element and picks, for each
k, the bucket holding the k-th largest; pass 2 histograms the low 16 bits of
the elements in each chosen bucket. Memory is two 65536-bin histograms per
distinct bucket, whatever the size of the stream.
"""
from __future__ import annotations

import math
import struct
from typing import Callable, Iterable

import torch


def _locate(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest element (k >= 1, k <= hist.sum()), and the
    rank of that element among the elements of its bin."""
    above = torch.flip(hist, [0]).cumsum(0)  # above[j]: count in bins >= 65535-j
    if k > int(above[-1]):
        raise RuntimeError("kth_largest_abs: make_stream() yielded different data on its second pass")
    j = int(torch.searchsorted(above, k))    # first j with above[j] >= k
    before = int(above[j - 1]) if j else 0
    return 65535 - j, k - before


def kth_largest_abs(make_stream: Callable[[], Iterable], ks: list[int], with_counts: bool = False) -> list:
    """k-th largest |x - base| for each k (inf for k <= 0, 0.0 for k > total).

    with_counts: return (value, n_above) pairs instead, n_above = how many
    elements are strictly larger than the value (so k - n_above of the
    elements equal to it are needed to select exactly k); needs k <= total.
    """
    from weightops.ops import abs_histogram

    coarse = torch.zeros(65536, dtype=torch.int64)
    for x, base in make_stream():
        coarse += abs_histogram(x, base, -1).cpu()
    total = int(coarse.sum())

    out: list[float | None] = [None] * len(ks)
    above: list[int] = [0] * len(ks)
    want: dict[int, list[tuple[int, int]]] = {}  # prefix -> [(index into ks, rank in bucket)]
    for i, k in enumerate(ks):
        if k <= 0:
            out[i] = math.inf
        elif k > total:
            if with_counts:
                raise ValueError(f"with_counts needs k <= {total} (the number of elements), got {k}")
            out[i] = 0.0
        else:
            prefix, rank = _locate(coarse, k)
            want.setdefault(prefix, []).append((i, rank))
    if not want:
        return list(zip(out, above)) if with_counts else out

    fine = {p: torch.zeros(65536, dtype=torch.int64) for p in want}
    for x, base in make_stream():
        for p in want:
            fine[p] += abs_histogram(x, base, p).cpu()
    for p, items in want.items():
        for i, rank in items:
            low, rank_in_bin = _locate(fine[p], rank)
            out[i] = struct.unpack("<f", struct.pack("<I", (p << 16) | low))[0]
            above[i] = ks[i] - rank_in_bin
    return list(zip(out, above)) if with_counts else out
