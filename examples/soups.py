"""Model soups of real fine-tunes of all-MiniLM-L6-v2 (zoo), scored on held-out, test and shifted data.

    python examples/soups.py            # results: benchmarks/results/soups.json and soups.png

Ingredients: the zoo's four sentiment fine-tunes with different
hyperparameters (learning rate 1e-4 / 5e-5, seeds 0 / 1).
Every model is scored on the in-distribution validation and test splits and
on two halves of the shifted test split: A (held out: greedy decisions and
learned-soup training use it) and B (reported only). Soups (the API the CLI
calls):

    weightops soup ING... --method greedy --eval zoo:sentiment:validation --out soup
    weightops soup ING... --method greedy --eval "seqcls:shifted_A.jsonl?tokenizer=...&max_length=64" --out soup
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


def write_split(rows, path: Path) -> Path:
    path.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in rows) + "\n")
    return path


def main() -> None:
    t0 = time.perf_counter()
    paths = ready_or_build(INGREDIENTS)
    print(f"zoo ready in {time.perf_counter() - t0:.0f} s under {zoo.zoo_dir()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="weightops-soups-"))
    # The in-distribution validation split is saturated (the lr 1e-4 fine-tunes score 1.0), so it cannot
    # tell ingredients apart; the shifted test split is cut in two halves: A is held out for the soups'
    # decisions, B is only reported.
    shifted_rows = zoo.load_task(TASK)["test_shifted"]
    half = len(shifted_rows) // 2
    tok = f"tokenizer={zoo_pretrained()}&max_length=64"
    specs = {
        "validation": f"zoo:{TASK}:validation",
        "test": f"zoo:{TASK}:test",
        "shifted_A": f"seqcls:{write_split(shifted_rows[:half], work / 'shifted_A.jsonl')}?{tok}",
        "shifted_B": f"seqcls:{write_split(shifted_rows[half:], work / 'shifted_B.jsonl')}?{tok}",
    }
    evs = {k: make_evaluator(v) for k, v in specs.items()}

    rows = []

    def report(name, kind, path, **extra):
        row = {"model": name, "kind": kind, **{k: ev(path) for k, ev in evs.items()}, **extra}
        rows.append(row)
        print(f"{name:<36} " + "  ".join(f"{k} {row[k]:.4f}" for k in evs), flush=True)
        return row

    for name in INGREDIENTS:
        report(name, "ingredient", paths[name])

    ings = [paths[n] for n in INGREDIENTS]
    runs = [("uniform", "uniform", None, {}),
            ("greedy (validation)", "greedy", "validation", {}),
            ("greedy (shifted A)", "greedy", "shifted_A", {}),
            ("greedy > (shifted A)", "greedy", "shifted_A", {"accept": "gt"}),
            ("learned (shifted A)", "learned", "shifted_A", {"steps": 60, "lr": 0.1}),
            ("learned per-layer (shifted A)", "learned", "shifted_A", {"steps": 60, "lr": 0.1, "per_layer": True})]
    for label, method, held, kw in runs:
        t = time.perf_counter()
        res = soup(ings, out=work / label.replace(" ", "_"), method=method, evaluator=specs[held] if held else None,
                   quiet=True, echo=lambda s: print("  " + s.replace(str(zoo.zoo_dir()) + "/", ""), flush=True), **kw)
        report(f"{label} soup", "soup", res.out, held_out=held, ingredients=[Path(x).name for x in res.ingredients],
               weights=res.weights, seconds=round(time.perf_counter() - t, 1),
               log=[{k: (Path(v).name if k == "add" else v) for k, v in e.items() if k != "soup"}
                    for e in res.log if e["step"] != "train"])

    summary = {}
    for held in ("validation", "shifted_A"):
        best = max((r for r in rows if r["kind"] == "ingredient"), key=lambda r: r[held])
        greedy = next(r for r in rows if r["model"] == f"greedy ({'validation' if held == 'validation' else 'shifted A'}) soup")
        summary[held] = {"best_ingredient": best["model"],
                         "greedy_minus_best": {k: round(greedy[k] - best[k], 4) for k in evs}}
        print(f"held out = {held}: greedy soup − best single ingredient {best['model']}: {summary[held]['greedy_minus_best']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    report_ = {"command": "python examples/soups.py", "task": TASK, "evaluators": specs, "rows": rows,
               "summary": summary, "seconds": round(time.perf_counter() - t0, 1),
               "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "load_average": os.getloadavg()}}
    (RESULTS / "soups.json").write_text(json.dumps(report_, indent=2) + "\n")
    plot(rows, RESULTS / "soups.png")
    print(f"wrote {RESULTS / 'soups.json'} and soups.png in {report_['seconds']} s")


def ready_or_build(names: list[str]) -> dict[str, Path]:
    """Zoo paths; models already built and current are used as they are, even while a parent (here only
    `base`, which soups do not read) is being rebuilt by another process; the rest are built."""
    from weightops.zoo.builder import is_built, keys

    k = keys(names)
    ready = {n: zoo.zoo_dir() / n for n in names if is_built(zoo.zoo_dir() / n, k[n])}
    missing = [n for n in names if n not in ready]
    return {**ready, **(zoo.build(missing) if missing else {})}


def zoo_pretrained() -> str:
    from weightops.zoo.runtime import pretrained_dir

    return str(pretrained_dir())


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = ("validation", "test", "shifted_A", "shifted_B")
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(splits)
    for j, s in enumerate(splits):
        ax.bar([i + j * width for i in range(len(rows))], [r[s] for r in rows], width, label=s)
    ax.set_xticks([i + 1.5 * width for i in range(len(rows))], [r["model"].replace("sentiment-", "") for r in rows],
                  rotation=30, ha="right")
    lo = min(r[s] for r in rows for s in splits)
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_ylabel("accuracy")
    ax.set_title("Soups of all-MiniLM-L6-v2 sentiment fine-tunes")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
