"""Skill localization by grafting on a real model (all-MiniLM-L6-v2 fine-tuned on two zoo tasks).

For each task (sentiment, topic): test accuracy of the fine-tuned model, of the
base body with the fine-tuned head only ("head only"), and of grafts
θ0 + γ⊙δ with the data-free top-|δ| mask over the transformer layers at
several sparsities (the head is taken whole from the fine-tune: the zoo trains
it, the paper's prompt-based setup had none); then learned masks at a few
sparsities (few-shot: `--learn-train` examples of the train split, selected on
as many validation examples); then the overlap of the two tasks' masks.

    python examples/grafting.py                       # ~10-20 min on 2 cores, builds the zoo models if missing
    python examples/grafting.py --quick               # fewer points, for a smoke run

Writes benchmarks/results/grafting.json, grafting_curve.png and grafting_overlap.png.
Every number in docs/grafting.md comes from that JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"sentiment": "sentiment-ft-lr1e-4-s0", "topic": "topic-ft-lr1e-4-s0"}
HEAD = r"^classifier\."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsities", default="1e-5,1e-4,1e-3,1e-2,5e-2")
    ap.add_argument("--learn-sparsities", default="1e-4,1e-3")
    ap.add_argument("--learn-train", type=int, default=64, help="training examples for the learned masks (few-shot)")
    ap.add_argument("--learn-steps", type=int, default=30)
    ap.add_argument("--learn-lr", type=float, default=1e7)
    ap.add_argument("--overlap-sparsity", type=float, default=1e-3)
    ap.add_argument("--limit", type=int, default=None, help="score only this many test examples")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "grafting.json"))
    args = ap.parse_args()
    if args.quick:
        args.sparsities, args.learn_sparsities, args.learn_steps, args.limit = "1e-4,1e-2", "1e-3", 5, 200

    import torch

    from weightops import zoo
    from weightops.sparse.graft import graft
    from weightops.sparse.learn import learn_mask
    from weightops.sparse.masks import overlap, overlap_heatmap, overlap_table

    torch.manual_seed(0)
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    learn_sp = [float(s) for s in args.learn_sparsities.split(",") if s]
    base = zoo.get("base")
    work = Path(tempfile.mkdtemp(prefix="grafting-"))
    results = {"command": " ".join(["python", "examples/grafting.py"] + sys.argv[1:]), "models": MODELS,
               "split": "test", "limit": args.limit, "tasks": {}, "torch_threads": torch.get_num_threads()}
    t_start = time.perf_counter()

    def acc(model_dir, task):
        return round(zoo.evaluate(model_dir, task, split="test", limit=args.limit), 4)

    try:
        for task, name in MODELS.items():
            ft = zoo.get(name)
            r = {"finetuned": acc(ft, task), "graft": [], "learned": []}
            g0 = work / f"{task}-head"
            graft(base, ft, out=g0, k=0, whole=HEAD)
            r["head_only"] = acc(g0, task)
            r["base_with_head_from_ft"] = r["head_only"]
            for sp in sparsities:
                t0 = time.perf_counter()
                out, mask = work / f"{task}-{sp:g}", work / f"{task}-{sp:g}-mask"
                res = graft(base, ft, out=out, mask_out=mask, sparsity=sp, whole=HEAD)
                secs = time.perf_counter() - t0
                m = res["method"]
                r["graft"].append({"sparsity": sp, "k": m["k"], "n_eligible": m["n_eligible"],
                                   "threshold": m["threshold"], "accuracy": acc(out, task), "graft_seconds": round(secs, 2)})
                print(f"{task}: graft {sp:g} (k={m['k']}): {r['graft'][-1]['accuracy']}", flush=True)
                shutil.rmtree(out)
            for sp in learn_sp:
                t0 = time.perf_counter()
                out = work / f"{task}-learned-{sp:g}"
                res = learn_mask(base, ft, f"zoo:{task}:{args.learn_train}", sparsity=sp, whole=HEAD, out=out,
                                 mask_out=work / f"{task}-learned-{sp:g}-mask", steps=args.learn_steps,
                                 lr=args.learn_lr, eval_every=5, seed=0)
                r["learned"].append({"sparsity": sp, "accuracy": acc(out, task), "best_step": res["best_step"],
                                     "best_train": res["best_train"], "best_dev": res["best_dev"],
                                     "changed_from_init": res["changed_from_init"],
                                     "loss_first": res["losses"][0] if res["losses"] else None,
                                     "loss_last": res["losses"][-1] if res["losses"] else None,
                                     "steps": args.learn_steps, "lr": args.learn_lr, "train_examples": args.learn_train,
                                     "seconds": round(time.perf_counter() - t0, 1)})
                print(f"{task}: learned {sp:g}: {r['learned'][-1]}", flush=True)
                shutil.rmtree(out)
            results["tasks"][task] = r
            print(f"{task}: fine-tuned {r['finetuned']}, head only {r['head_only']}", flush=True)

        sp = args.overlap_sparsity
        masks = []
        for task, name in MODELS.items():
            p = work / f"{task}-{sp:g}-mask"
            if not p.exists():
                graft(base, zoo.get(name), mask_out=p, sparsity=sp, whole=None)
            masks.append(p)
        rep = overlap(masks, labels=list(MODELS))
        print(overlap_table(rep))
        RESULTS.mkdir(parents=True, exist_ok=True)
        overlap_heatmap(rep, RESULTS / "grafting_overlap.png")
        results["overlap"] = {"sparsity": sp, "overall": rep["overall"],
                              "per_layer": {g: {"jaccard": v["jaccard"][0][1], "asym_topic_in_sentiment": v["asym"][0][1],
                                                "intersection": v["intersection"][0][1], "sizes": v["size"]}
                                            for g, v in rep["per_layer"].items()}}
        results["seconds"] = round(time.perf_counter() - t_start, 1)
        _plot(results, RESULTS / "grafting_curve.png")
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}, {RESULTS / 'grafting_curve.png'}, {RESULTS / 'grafting_overlap.png'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (task, r) in enumerate(results["tasks"].items()):
        c = f"C{i}"
        xs = [g["sparsity"] for g in r["graft"]]
        ax.plot(xs, [g["accuracy"] for g in r["graft"]], "o-", color=c, label=f"{task}: data-free top-|δ|")
        if r["learned"]:
            ax.plot([g["sparsity"] for g in r["learned"]], [g["accuracy"] for g in r["learned"]], "s--", color=c,
                    label=f"{task}: learned")
        ax.axhline(r["finetuned"], color=c, lw=0.8, ls=":", label=f"{task}: fine-tuned")
        ax.axhline(r["head_only"], color=c, lw=0.8, ls="-.", alpha=0.6, label=f"{task}: head only")
    ax.set_xscale("log")
    ax.set_xlabel("grafted fraction of transformer-layer parameters")
    ax.set_ylabel("test accuracy")
    ax.set_title("all-MiniLM-L6-v2: grafting the fine-tuned values back")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
