"""WiSE-FT on a real fine-tune of all-MiniLM-L6-v2 (zoo): the α curve in and out of distribution,
the per-layer sweep, and sparsified straggler layers.

    python examples/interpolate.py      # results: benchmarks/results/interpolate/*

θ0 is the zoo's `base` (pre-trained MiniLM body with the zoo's seeded,
untrained binary head, so α = 0 is at chance), θft a sentiment fine-tune. Steps, each the API behind a
CLI command:
1. the WiSE-FT curve, α = 0..1, on test (in distribution) and test_shifted:
   weightops interpolate BASE FT --alphas 0:1:0.1 --eval id=zoo:sentiment:test --eval ood=zoo:sentiment:test_shifted
2. per-layer sweeps, one group's α at a time: (a) the others at 1 (the
   fine-tune), scored on test_shifted, ranking the groups whose α moves the
   shifted score most; (b) the others at 0, scored on validation:
   weightops interpolate BASE FT --per-layer --alphas 0:1:0.5 --eval zoo:sentiment:test_shifted
   weightops interpolate BASE FT --per-layer --rest-alpha 0 --alphas 0:1:0.5 --eval zoo:sentiment:validation
3. the curve again with the top-2 groups of (a) sparsified (top 10% of |δ|
   kept), against the dense curve (chosen and scored on the same shifted split:
   an analysis, not a held-out result):
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

    # (a) each group reverted towards θ0 alone, the rest fine-tuned, scored out of distribution. This is
    # analysis on the shifted split itself (validation is saturated at 1.0 at α=1, so it cannot rank).
    layers = sweep(base, ft, alphas="0:1:0.5", evals={"ood": "zoo:sentiment:test_shifted"}, out=OUT / "per_layer_ood",
                   per_layer=True, rest_alpha=1.0, quiet=True)
    ranking = layers["stragglers"]["ood"]
    summary["per_layer_ood"] = {"rest_alpha": 1.0, "alphas": layers["alphas"], "scores": layers["per_layer"],
                                "ranking": ranking}
    summary["rel_delta"] = {g: s["rel_delta"] for g, s in layers["path_stats"].items()}
    print("shifted accuracy with one group at α (others at 1):  α=0 / 0.5 / 1")
    for g, v in layers["per_layer"].items():
        print(f"  {g:<12} {'  '.join(f'{x:.4f}' for x in v['ood'])}   ‖δ‖/‖θ0‖ {summary['rel_delta'][g]:.4f}")
    # (b) each group fine-tuned alone, the rest at θ0, on held-out validation: which group carries the task
    alone = sweep(base, ft, alphas="0:1:0.5", evals={"val": "zoo:sentiment:validation"}, out=OUT / "per_layer_alone",
                  per_layer=True, rest_alpha=0.0, quiet=True)
    summary["per_layer_alone_val"] = {"rest_alpha": 0.0, "alphas": alone["alphas"], "scores": alone["per_layer"],
                                      "ranking": alone["stragglers"]["val"]}
    print("validation accuracy with one group at α (others at 0):  α=0 / 0.5 / 1")
    for g, v in alone["per_layer"].items():
        print(f"  {g:<12} {'  '.join(f'{x:.4f}' for x in v['val'])}")

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
    print(f"wrote {OUT}/summary.json and curve/, per_layer_ood/, per_layer_alone/, sparsified/ (JSON + PNG) in {summary['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
