"""Delta statistics (`weightops delta-stats`) and the DPP recommendation (`weightops recommend-dpp`).

delta_stats streams over the float tensors: per tensor the mean and std of
δ (float64 running sums), exact |δ| percentiles (`ops.kth_largest_abs`, two
passes) and L2 norms; the same over the whole model.

recommend_dpp applies our reading of the paper's selection flowchart
(DAREx, Fig. 4; shared/research/dare-darex.md §4): large deltas →
importance-based pruning (WANDA with calibration data, else magnitude); small
deltas and a high rate → DAREx-q (q from a validation metric if there is one,
else the unlabelled proxy, else the analytic per-layer q); otherwise DARE.
The paper gives no numeric threshold; ours is p99(|δ|) > 0.005, anchored on
the DARE paper's "SFT delta ranges are typically within 0.005", and is a flag.
"""
from __future__ import annotations

import math

import torch

from weightops import ops

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
LARGE_DELTA = 0.005
HIGH_RATE = 0.95


def _kth_for(pct: float, n: int) -> int:
    """k (k-th largest) of the pct-th percentile (nearest rank) of n values."""
    return n - max(1, math.ceil(pct / 100 * n)) + 1


def delta_stats(base, finetuned, *, block_size: int = 1 << 22, percentiles=PERCENTILES, exclude: str | None = None,
                quiet: bool = True) -> dict:
    """Per-tensor and whole-model statistics of δ = finetuned − base (paths or LoRA adapter on base)."""
    import re

    from weightops.engine import _progress
    from weightops.io.checkpoint import Checkpoint, open_source

    b = Checkpoint(base)
    ft = open_source(finetuned, b)
    pat = re.compile(exclude) if exclude else None
    names = [n for n, i in b.infos.items() if i.is_float and n in ft.infos and tuple(ft.infos[n].shape) == tuple(i.shape)
             and not (pat and pat.search(n))]

    def stream(names_):
        def make():
            for n in names_:
                numel = b.infos[n].numel
                for s in range(0, numel, block_size):
                    e = min(numel, s + block_size)
                    yield ft.read(n, s, e), b.read(n, s, e)
        return make

    rows, tot = [], {"n": 0, "s": 0.0, "s2": 0.0, "abs": 0.0, "b2": 0.0}
    with _progress(sum(b.infos[n].nbytes for n in names) * 3, quiet, "delta-stats") as bar:
        for n in names:
            acc = {"s": 0.0, "s2": 0.0, "abs": 0.0, "b2": 0.0, "max": 0.0}
            numel = b.infos[n].numel
            for s in range(0, numel, block_size):
                e = min(numel, s + block_size)
                x, y = ft.read(n, s, e).double(), b.read(n, s, e).double()
                d = x - y
                acc["s"] += d.sum().item()
                acc["s2"] += (d * d).sum().item()
                acc["abs"] += d.abs().sum().item()
                acc["b2"] += (y * y).sum().item()
                acc["max"] = max(acc["max"], d.abs().max().item() if d.numel() else 0.0)
                bar.update(3 * (e - s) * b.infos[n].nbytes // max(numel, 1))
            pct = ops.kth_largest_abs(stream([n]), [_kth_for(p, numel) for p in percentiles]) if numel else [0.0] * len(percentiles)
            mean = acc["s"] / numel if numel else 0.0
            var = max(acc["s2"] / numel - mean * mean, 0.0) if numel else 0.0
            rows.append({"name": n, "numel": numel, "mean": mean, "std": math.sqrt(var), "mean_abs": acc["abs"] / max(numel, 1),
                         "max_abs": acc["max"], "l2": math.sqrt(acc["s2"]),
                         "rel_l2": math.sqrt(acc["s2"]) / math.sqrt(acc["b2"]) if acc["b2"] > 0 else math.inf,
                         **{f"p{p:g}": v for p, v in zip(percentiles, pct)}})
            tot["n"] += numel
            for k in ("s", "s2", "abs", "b2"):
                tot[k] += acc[k]
    n = tot["n"]
    gp = ops.kth_largest_abs(stream(names), [_kth_for(p, n) for p in percentiles]) if n else [0.0] * len(percentiles)
    mean = tot["s"] / n if n else 0.0
    model = {"numel": n, "tensors": len(names), "mean": mean, "std": math.sqrt(max(tot["s2"] / n - mean * mean, 0.0)) if n else 0.0,
             "mean_abs": tot["abs"] / max(n, 1), "max_abs": max((r["max_abs"] for r in rows), default=0.0),
             "l2": math.sqrt(tot["s2"]), "rel_l2": math.sqrt(tot["s2"] / tot["b2"]) if tot["b2"] > 0 else math.inf,
             **{f"p{p:g}": v for p, v in zip(percentiles, gp)}}
    return {"base": str(b.path), "finetuned": str(ft.path), "model": model, "tensors": rows}


def recommend_dpp(stats: dict, *, rate: float = 0.9, calibration: bool = False, validation: bool = False,
                  unlabelled: bool = False, decoder: bool = False, large_delta: float = LARGE_DELTA,
                  high_rate: float = HIGH_RATE) -> dict:
    """{"method", "q_by", "command_flags", "reasons": [...]} from delta statistics and the data at hand."""
    from weightops.errors import check_finite

    check_finite(rate=rate, large_delta=large_delta, high_rate=high_rate)
    m = stats["model"]
    p99 = m.get("p99", m["max_abs"])
    large = p99 > large_delta
    why = [f"deltas: mean {m['mean']:.3g}, std {m['std']:.3g}, p99 |δ| {p99:.3g}, max |δ| {m['max_abs']:.3g} "
           f"({'LARGE' if large else 'small'}: p99 |δ| {'>' if large else '<='} {large_delta:g})"]
    q_by = None
    if large:
        method = "wanda" if calibration else "magnitude"
        why.append("large deltas: random DPP (DARE) rescales big, high-variance deltas into large output changes; "
                   "importance-based pruning keeps the big ones")
        why.append("calibration inputs available: WANDA |δ|·‖X‖" if calibration else
                   "no calibration inputs: magnitude |δ| (WANDA needs --calib-data)")
        flags = ["--method", method] + (["--calib-data", "FILE"] if calibration else [])
    elif rate >= high_rate:
        if validation:
            q_by = "metric"
        elif unlabelled or calibration:
            q_by = "analytic" if (calibration and not unlabelled and not decoder) else "proxy"
        if q_by is None:
            method = "magnitude"
            why.append(f"rate {rate:g} >= {high_rate:g}: DARE's 1/(1-p) rescale collapses; DAREx-q needs data to "
                       "choose q and none is available, so use data-free magnitude pruning (or a lower rate)")
            flags = ["--method", "magnitude"]
        else:
            method = "darex-q"
            why.append(f"small deltas at rate {rate:g} >= {high_rate:g}: DARE's 1/(1-p) rescale over-amplifies; "
                       "DAREx-q rescales by 1/q with q chosen from data")
            why.append({"metric": "a labelled validation metric is available: search q on it",
                        "proxy": "unlabelled inputs: choose q minimising the "
                                 + ("top-5-logit MSE (decoder; global q is recommended for decoders)" if decoder
                                    else "last-hidden-state change"),
                        "analytic": "calibration inputs only: per-layer analytic q (eta default 0.45 untuned)"}[q_by])
            flags = ["--method", "darex-q", "--q", "auto", "--q-by", q_by] + \
                {"metric": ["--metric", "SPEC"], "proxy": ["--proxy-data", "FILE"], "analytic": ["--calib-data", "FILE"]}[q_by]
    else:
        method = "dare"
        why.append(f"small deltas at rate {rate:g} < {high_rate:g}: plain DARE stays close to the fine-tuned model")
        flags = ["--method", "dare"]
    return {"method": method, "q_by": q_by, "rate": rate, "large_deltas": large,
            "command_flags": flags + ["--rate", f"{rate:g}"], "reasons": why}
