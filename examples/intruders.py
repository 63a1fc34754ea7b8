"""Intruder dimensions on a real model: LoRA r=1/8/64 vs full fine-tuning of all-MiniLM-L6-v2.

The zoo (weightops.zoo) fine-tunes all-MiniLM-L6-v2 on the same sentiment task
with full fine-tuning and with LoRA (all attention and MLP linears, alpha 16)
at rank 1, 8 and 64, plus rank 64 with rsLoRA. This script

1. builds those models if needed (minutes on 2 cores, cached afterwards),
2. writes one comparison report (report.json, index.html, PNG plots) with
   `weightops.spectral.analyse` — the same as
       weightops intruders BASE LORA_R1 LORA_R8 LORA_R64 LORA_R64_RS FULL_FT --labels ... --out DIR
3. checks the fast path against the full-SVD reference (`--exact`): counts equal,
4. mitigation: writes the LoRA r=8 model (--mitigate) with the intruders' σ scaled by
   λ ∈ {1, 0.75, 0.5, 0} and measures intruders and accuracy (test, shifted test),
and writes a summary to benchmarks/results/intruders_zoo.json.

    python examples/intruders.py                       # everything
    python examples/intruders.py --no-mitigation       # only the report
    python examples/intruders.py --targets lora-r1,lora-r8,full-ft
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"lora-r1": "sentiment-lora-r1", "lora-r8": "sentiment-lora-r8", "lora-r64": "sentiment-lora-r64",
           "lora-r64-rs": "sentiment-lora-r64-rs", "full-ft": "sentiment-ft-lr1e-4-s0"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default=str(ROOT / "benchmarks" / "results" / "intruders_zoo"),
                    help="directory of the HTML report (replaced)")
    ap.add_argument("--summary", default=str(ROOT / "benchmarks" / "results" / "intruders_zoo.json"))
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"labels to compare, from {', '.join(TARGETS)}")
    ap.add_argument("--mitigate", default="lora-r8", help="the target whose intruders are scaled (default lora-r8, "
                    "else the first LoRA among --targets)")
    ap.add_argument("--no-mitigation", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N examples of each split")
    args = ap.parse_args()

    from weightops import zoo
    from weightops.spectral import Options, analyse, write_model, write_report

    def model(name: str) -> Path:
        """A built zoo model without waiting for the zoo's build lock (another build may hold it), else build it."""
        built = {c["name"] for c in zoo.list_models()}
        return zoo.zoo_dir() / name if name in built else zoo.get(name)

    t0 = time.perf_counter()
    base = model("base")
    labels = [x.strip() for x in args.targets.split(",") if x.strip()]
    unknown = [x for x in labels if x not in TARGETS]
    if unknown:
        raise SystemExit(f"unknown target label(s) {unknown}; choose from {list(TARGETS)}")
    paths = {label: model(TARGETS[label]) for label in labels}
    print(f"zoo ready in {time.perf_counter() - t0:.0f} s", flush=True)

    with tempfile.TemporaryDirectory(prefix="wo-intruders-") as tmp:
        cache = Path(tmp) / "svd"
        t1 = time.perf_counter()
        rep = analyse(str(base), [str(p) for p in paths.values()], labels=list(paths),
                      opts=Options(cache_dir=str(cache)), command=["examples/intruders.py"])
        fast_s = time.perf_counter() - t1
        write_report(rep, args.report, force=True)
        t2 = time.perf_counter()
        exact = analyse(str(base), [str(p) for p in paths.values()], labels=list(paths),
                        opts=Options(solver="exact", cache_dir=None), quiet=True)
        exact_s = time.perf_counter() - t2
        same = all(a["counts_vs_eps"] == b["counts_vs_eps"] for a, b in zip(rep["targets"], exact["targets"]))

        summary = {
            "model": "all-MiniLM-L6-v2 (zoo), sentiment task",
            "params": rep["params"],
            "targets": {t["label"]: {"zoo_name": TARGETS[t["label"]], "kind": t["kind"], "adapter": t.get("adapter"),
                                     "intruders_at_0.5": t["total"],
                                     "matrices_with_intruders": f"{t['matrices_with_intruders']}/{t['n_matrices']}",
                                     "counts_vs_eps": {e: c for e, c in t["counts_vs_eps"].items()
                                                       if float(e) in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)},
                                     "mean_delta_rel": sum(m["delta_rel"] for m in t["matrices"]) / len(t["matrices"]),
                                     "solvers": t["solvers"]}
                        for t in rep["targets"]},
            "fast_equals_exact": same,
            "seconds": {"fast_cold_cache": round(fast_s, 2), "exact": round(exact_s, 2)},
        }
        for label, t in summary["targets"].items():
            print(f"{label:12s} intruders@0.5 = {t['intruders_at_0.5']:3d} in {t['matrices_with_intruders']} matrices;"
                  f" vs ε {t['counts_vs_eps']}")
        print(f"fast == exact at every ε: {same} (fast {fast_s:.1f} s incl. base SVDs, exact {exact_s:.1f} s)")

        mit = args.mitigate if args.mitigate in paths else next((x for x in paths if x.startswith("lora")), None)
        if not args.no_mitigation and mit is not None:
            rows = []
            for lam in (1.0, 0.75, 0.5, 0.0):
                out = Path(tmp) / f"mitigated-{lam}"
                mrep, res = write_model(str(base), str(paths[mit]), str(out), lam=lam,
                                        opts=Options(cache_dir=str(cache)), quiet=True)
                after = analyse(str(base), [str(out)], opts=Options(cache_dir=str(cache)), quiet=True)["targets"][0]
                row = {"lambda": lam, "scaled": res.manifest["intruders"]["total"], "intruders_after": after["total"]}
                for split in ("test", "test_shifted"):
                    row[f"acc_{split}"] = round(zoo.evaluate(out, "sentiment", split, limit=args.limit), 4)
                rows.append(row)
                print(f"{mit} mitigated λ={lam}: {row}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            summary["mitigation"] = {"target": mit, "rows": rows, "eval_limit": args.limit}
    Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
    Path(args.summary).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.summary} and {args.report}/index.html")


if __name__ == "__main__":
    main()
