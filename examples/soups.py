"""Model soups of real fine-tunes of all-MiniLM-L6-v2 (zoo), scored on held-out, test and shifted data.

    python examples/soups.py            # results: benchmarks/results/soups.json and soups.png

Ingredients: the zoo's four sentiment fine-tunes with different
hyperparameters (learning rate 1e-4 / 5e-5, seeds 0 / 1).
Each ingredient is scored on the validation split (held out: the greedy
soup's decisions and the learned soup's training use it) and on the test and
test_shifted splits (reported only). Then the uniform, greedy and learned
soups, through the same API the CLI calls:

    weightops soup ING... --method greedy --eval zoo:sentiment:validation --out soup
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from weightops import zoo
from weightops.evaluate import make_evaluator
from weightops.soup import soup

TASK = "sentiment"
INGREDIENTS = ["sentiment-ft-lr1e-4-s0", "sentiment-ft-lr1e-4-s1", "sentiment-ft-lr5e-5-s0", "sentiment-ft-lr5e-5-s1"]
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def main() -> None:
    t0 = time.perf_counter()
    paths = zoo.build(["base"] + INGREDIENTS)
    print(f"zoo ready in {time.perf_counter() - t0:.0f} s under {zoo.zoo_dir()}", flush=True)
    held_out = f"zoo:{TASK}:validation"
    test = make_evaluator(f"zoo:{TASK}:test")
    shifted = make_evaluator(f"zoo:{TASK}:test_shifted")
    val = make_evaluator(held_out)

    rows = []
    for name in INGREDIENTS:
        p = paths[name]
        rows.append({"model": name, "kind": "ingredient", "validation": val(p), "test": test(p), "test_shifted": shifted(p)})
        print(f"{name:<28} val {rows[-1]['validation']:.4f}  test {rows[-1]['test']:.4f}  "
              f"shifted {rows[-1]['test_shifted']:.4f}", flush=True)

    out = Path(tempfile.mkdtemp(prefix="weightops-soups-"))
    ings = [paths[n] for n in INGREDIENTS]
    soups = {}
    for method, kw in (("uniform", {}), ("greedy", {}), ("learned", {"steps": 60, "lr": 0.1}),
                       ("learned per-layer", {"steps": 60, "lr": 0.1, "per_layer": True})):
        t = time.perf_counter()
        res = soup(ings, out=out / method.replace(" ", "-"), method=method.split()[0], evaluator=held_out,
                   quiet=True, echo=lambda s: print("  " + s.replace(str(zoo.zoo_dir()) + "/", ""), flush=True), **kw)
        soups[method] = res
        kept = [Path(x).name for x in res.ingredients]
        rows.append({"model": f"{method} soup", "kind": "soup", "validation": res.score, "test": test(res.out),
                     "test_shifted": shifted(res.out), "ingredients": kept,
                     "weights": res.weights, "seconds": round(time.perf_counter() - t, 1),
                     "log": [{k: (Path(v).name if k == "add" else v) for k, v in e.items() if k != "soup"}
                             for e in res.log if e["step"] != "train"]})
        print(f"{method + ' soup':<28} val {res.score:.4f}  test {rows[-1]['test']:.4f}  "
              f"shifted {rows[-1]['test_shifted']:.4f}  ({len(kept)} ingredients, {rows[-1]['seconds']} s)", flush=True)

    best = max((r for r in rows if r["kind"] == "ingredient"), key=lambda r: r["validation"])
    greedy = next(r for r in rows if r["model"] == "greedy soup")
    summary = {"best_ingredient_by_validation": best["model"],
               "greedy_minus_best_ingredient": {k: round(greedy[k] - best[k], 4) for k in ("validation", "test", "test_shifted")}}
    print("greedy soup − best single ingredient (chosen on validation):", summary["greedy_minus_best_ingredient"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"command": "python examples/soups.py", "task": TASK, "held_out": held_out, "rows": rows,
              "summary": summary, "seconds": round(time.perf_counter() - t0, 1),
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "load_average": os.getloadavg()}}
    (RESULTS / "soups.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, RESULTS / "soups.png")
    print(f"wrote {RESULTS / 'soups.json'} and soups.png in {report['seconds']} s")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = ("validation", "test", "test_shifted")
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(splits)
    for j, s in enumerate(splits):
        ax.bar([i + j * width for i in range(len(rows))], [r[s] for r in rows], width, label=s)
    ax.set_xticks([i + width for i in range(len(rows))], [r["model"].replace("sentiment-", "") for r in rows],
                  rotation=30, ha="right")
    lo = min(r[s] for r in rows for s in splits)
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_ylabel("accuracy")
    ax.set_title("Soups of all-MiniLM-L6-v2 sentiment fine-tunes (greedy decides on validation)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
