"""WiSE-FT on a real fine-tune of all-MiniLM-L6-v2 (zoo): the α curve in and out of distribution,
the per-layer sweep, and sparsified straggler layers.

    python examples/interpolate.py      # results: benchmarks/results/interpolate/*

θ0 is the zoo's `base` (pre-trained MiniLM with a linear-probe head: the
"zero-shot" end), θft a sentiment fine-tune. Steps, each the API behind a
CLI command:
1. the WiSE-FT curve, α = 0..1, on test (in distribution) and test_shifted:
   weightops interpolate BASE FT --alphas 0:1:0.1 --eval id=zoo:sentiment:test --eval ood=zoo:sentiment:test_shifted
2. the per-layer sweep on held-out data (validation), one group's α at a time,
   the others at 1 (the fine-tune), ranking the groups whose α moves the score most:
   weightops interpolate BASE FT --per-layer --alphas 0:1:0.5 --eval zoo:sentiment:validation
3. the curve again with the top-2 groups' deltas sparsified (top 10% of |δ|
   kept), against the dense curve:
   weightops interpolate BASE FT --sparsify-layers REGEX --density 0.1 --eval ...
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from weightops import zoo
from weightops.interpolate import sweep

FT = os.environ.get("WEIGHTOPS_WISE_FT", "sentiment-ft-lr1e-4-s0")
OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "interpolate"


def group_regex(groups: list[str]) -> str:
    """Tensor-name regex of layer groups ("layer.3" -> encoder.layer.3., "embeddings" -> embeddings.)."""
    parts = []
    for g in groups:
        m = re.fullmatch(r"layer\.(\d+)", g)
        parts.append(rf"(^|\.)(layers?|h|blocks?)\.{m.group(1)}\." if m else rf"(^|\.){re.escape(g)}\.")
    return "|".join(parts)


def main() -> None:
    t0 = time.perf_counter()
    paths = zoo.build(["base", FT])
    base, ft = paths["base"], paths[FT]
    evals = {"id": "zoo:sentiment:test", "ood": "zoo:sentiment:test_shifted"}
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    summary = {"command": "python examples/interpolate.py", "base": "base", "ft": FT}

    curve = sweep(base, ft, alphas="0:1:0.1", evals=evals, out=OUT / "curve", quiet=True)
    summary["alphas"] = curve["alphas"]
    summary["curve"] = curve["curve"]
    print("α      id      ood")
    for i, a in enumerate(curve["alphas"]):
        print(f"{a:4.1f}  {curve['curve']['id'][i]:.4f}  {curve['curve']['ood'][i]:.4f}")
    for n in ("id", "ood"):
        c = curve["curve"][n]
        b = max(range(len(c)), key=lambda i: (c[i], -i))
        summary[f"best_{n}"] = {"alpha": curve["alphas"][b], "score": c[b], "at_1": c[-1], "at_0": c[0]}
    print(f"best α in distribution {summary['best_id']}, shifted {summary['best_ood']}", flush=True)

    layers = sweep(base, ft, alphas="0:1:0.5", evals={"val": "zoo:sentiment:validation"}, out=OUT / "per_layer",
                   per_layer=True, quiet=True)
    ranking = layers["stragglers"]["val"]
    summary["per_layer_ranking"] = ranking
    summary["rel_delta"] = {g: s["rel_delta"] for g, s in layers["path_stats"].items()}
    print("groups whose own α moves validation accuracy most (others at α=1):")
    for r in ranking[:5]:
        print(f"  {r['group']:<12} range {r['range']:.4f}  best α {r['best_alpha']:g}  "
              f"(‖δ‖/‖θ0‖ {summary['rel_delta'][r['group']]:.4f})")

    top = [r["group"] for r in ranking[:2]]
    rx = group_regex(top)
    sparse = sweep(base, ft, alphas="0:1:0.2", evals=evals, out=OUT / "sparsified", sparsify=rx, density=0.1,
                   quiet=True)
    summary["sparsified"] = {"groups": top, "regex": rx, "density": 0.1, "alphas": sparse["alphas"],
                             "curve": sparse["curve"], "dense": sparse["curve_dense"]}
    print(f"top-2 groups {top} sparsified to 10% of |δ|:")
    print("α      id(sparse) id(dense)  ood(sparse) ood(dense)")
    for i, a in enumerate(sparse["alphas"]):
        print(f"{a:4.1f}  {sparse['curve']['id'][i]:.4f}     {sparse['curve_dense']['id'][i]:.4f}     "
              f"{sparse['curve']['ood'][i]:.4f}      {sparse['curve_dense']['ood'][i]:.4f}")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["load_average"] = os.getloadavg()
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {OUT}/summary.json and curve/, per_layer/, sparsified/ (JSON + PNG) in {summary['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
