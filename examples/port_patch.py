"""PortLLM on a real model: port a sentiment patch learned on v1 to an evolved v2, without training.

v1 = all-MiniLM-L6-v2 with the zoo's classifier init (`base`); v2 = `v2-base`, the
same model after a contrastive run on text from another domain (every weight moved);
the patch comes from `sentiment-lora-r8` (a LoRA fine-tune of v1) or from the full
fine-tune `sentiment-ft-lr1e-4-s0` (truncated SVD). The reference is
`sentiment-v2-ft`, the same task fine-tuned on v2.

Rows (accuracy on the sentiment test and shifted-test splits):
  v2 alone, v2 with only the fine-tune's classifier head, v1 fine-tunes (LoRA and
  full), v2 + LoRA patch (as a model and as a PEFT adapter on v2), v2 + SVD patches
  of the full fine-tune, and v2 fine-tuned.

Run: python examples/port_patch.py            (builds the 5 zoo models it needs once)
Writes benchmarks/results/port_patch.json and benchmarks/results/port_patch.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASK = "sentiment"
SPLITS = ("test", "test_shifted")
MODELS = {"v1": "base", "v2": "v2-base", "lora": "sentiment-lora-r8", "ft": "sentiment-ft-lr1e-4-s0",
          "v2_ft": "sentiment-v2-ft"}


def score(model_or_dir, head_from=None, limit=None) -> dict:
    from weightops import zoo

    return {s: zoo.evaluate(model_or_dir, TASK, s, head_from=head_from, limit=limit) for s in SPLITS}


def peft_on(v2_dir, adapter_dir):
    import peft
    from transformers import AutoModelForSequenceClassification

    return peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(v2_dir), adapter_dir).eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=None, help="Where patches and patched models go (default: a temp dir).")
    ap.add_argument("--limit", type=int, default=None, help="Score only the first N examples of each split (quick look).")
    ap.add_argument("--out", default=str(RESULTS / "port_patch.json"))
    args = ap.parse_args(argv)

    from weightops import zoo
    from weightops.patches import apply_patch, check_patch, create_patch

    t0 = time.perf_counter()
    paths = {k: zoo.get(v) for k, v in MODELS.items()}
    work = Path(args.work or tempfile.mkdtemp(prefix="port_patch-"))
    work.mkdir(parents=True, exist_ok=True)
    timings, rows = {}, []

    def timed(key, fn, *a, **kw):
        t = time.perf_counter()
        r = fn(*a, **kw)
        timings[key] = round(time.perf_counter() - t, 3)
        return r

    def row(label, how, scores):
        rows.append({"model": label, "how": how, **scores})
        print(f"{label:<40} " + "  ".join(f"{s} {scores[s]:.4f}" for s in SPLITS), flush=True)

    # 1. Patches: the LoRA adapter exactly; the full fine-tune by SVD at two ranks and at 90% energy.
    timed("create_lora", create_patch, paths["v1"], work / "p-lora", adapter=paths["lora"], force=True, quiet=True)
    svd = {}
    for tag, kw in (("r8", dict(rank=8)), ("r64", dict(rank=64)), ("e90", dict(energy=0.9))):
        svd[tag] = timed(f"create_svd_{tag}", create_patch, paths["v1"], work / f"p-svd-{tag}", finetuned=paths["ft"],
                         force=True, quiet=True, **kw)

    # 2. Check against v2, with the drift report against v1.
    rep = timed("check", check_patch, work / "p-lora", paths["v2"], source=paths["v1"])
    rep.raise_if_incompatible()
    low = [d for d in rep.drift if d["kind"] == "lowrank"]
    drift = {"targets": len(rep.drift), "source_matches": rep.source_matches,
             "median_drift_over_patch": statistics.median(d["drift_over_patch"] for d in low),
             "min_drift_over_patch": min(d["drift_over_patch"] for d in low),
             "max_drift_over_patch": max(d["drift_over_patch"] for d in low),
             "median_rel_drift": statistics.median(d["drift_norm"] / d["v1_norm"] for d in low)}

    # 3. Apply: v2 + patch as a model, and as a PEFT adapter on v2.
    timed("apply_lora", apply_patch, work / "p-lora", paths["v2"], work / "v2+lora", force=True, quiet=True)
    timed("apply_lora_as_adapter", apply_patch, work / "p-lora", paths["v2"], work / "v2+lora-adapter",
          as_adapter=True, force=True, quiet=True)
    for tag in svd:
        timed(f"apply_svd_{tag}", apply_patch, work / f"p-svd-{tag}", paths["v2"], work / f"v2+svd-{tag}", force=True, quiet=True)

    # 4. Score.
    lim = args.limit
    row("v2 alone", "v2-base with its own (untrained) head", score(paths["v2"], limit=lim))
    row("v2 + fine-tuned head only", "v2-base body, classifier of the full fine-tune", score(paths["v2"], head_from=paths["ft"], limit=lim))
    row("v1 + LoRA (fine-tuned v1)", "sentiment-lora-r8 on base", score(paths["lora"], limit=lim))
    row("v1 full fine-tune", "sentiment-ft-lr1e-4-s0", score(paths["ft"], limit=lim))
    row("v2 + LoRA patch (PortLLM)", "patch apply p-lora --to v2-base", score(work / "v2+lora", limit=lim))
    row("v2 + LoRA patch as PEFT adapter", "patch apply --as-adapter, loaded with peft", score(peft_on(paths["v2"], work / "v2+lora-adapter"), limit=lim))
    for tag, r in svd.items():
        ranks = [e["rank"] for e in r["entries"] if e["kind"] == "lowrank"]
        energy = statistics.median(e["energy"] for e in r["entries"] if e["kind"] == "lowrank")
        row(f"v2 + full-FT patch, SVD {tag}", f"median rank {statistics.median(ranks):g}, median energy {energy:.3f}, "
            f"{r['bytes'] / 1e6:.1f} MB", score(work / f"v2+svd-{tag}", limit=lim))
    row("v2 fine-tuned (re-training)", "sentiment-v2-ft", score(paths["v2_ft"], limit=lim))

    out = {"task": TASK, "splits": list(SPLITS), "limit": lim, "models": MODELS, "rows": rows, "drift": drift,
           "patch_mb": {"lora": round((work / "p-lora" / "patch.safetensors").stat().st_size / 1e6, 3),
                        **{f"svd_{t}": round(r["bytes"] / 1e6, 3) for t, r in svd.items()}},
           "seconds": timings, "total_seconds": round(time.perf_counter() - t0, 1),
           "command": "python examples/port_patch.py" + (f" --limit {lim}" if lim else "")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, Path(args.out).with_suffix(".png"))
    print(f"drift: median ‖θv2−θv1‖/‖ΔW‖ over {len(low)} patched matrices = {drift['median_drift_over_patch']:.2f} "
          f"(min {drift['min_drift_over_patch']:.2f}, max {drift['max_drift_over_patch']:.2f})")
    print(f"wrote {args.out} in {out['total_seconds']} s")
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    y = range(len(rows))
    for k, (split, color) in enumerate(zip(SPLITS, ("#4477aa", "#ee8866"))):
        ax.barh([i + 0.2 * (1 - 2 * k) for i in y], [r[split] for r in rows], height=0.38, color=color, label=split)
    ax.set_yticks(list(y), [r["model"] for r in rows])
    ax.invert_yaxis()
    ax.axvline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlim(0.0, 1.02)
    ax.set_xlabel(f"{TASK} accuracy")
    ax.set_title("Porting a v1 fine-tune to an evolved v2 without training (PortLLM)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
