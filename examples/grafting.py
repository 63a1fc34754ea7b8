"""Skill localization by grafting on a real model (all-MiniLM-L6-v2 fine-tuned on two zoo tasks).

The fine-tunes are the zoo's plain-SGD ones (embeddings frozen, as the
grafting paper's fine-tunes; `--optimizer adamw` takes the zoo's AdamW
fine-tunes instead, whose changes are spread evenly over the weights).
For each task (sentiment, topic): test accuracy of the fine-tuned model, of the
base body with the fine-tuned head only ("head only"), and of grafts
θ0 + γ⊙δ with the data-free top-|δ| mask over the transformer layers at
several sparsities (the classifier and pooler are taken whole from the
fine-tune: the zoo trains them from a random init; the paper's prompt-based
setup had no new head); then a learned mask (few-shot: `--learn-train`
examples of the train split, selected on as many validation examples); then
the overlap of the two tasks' layer masks.

    python examples/grafting.py                            # both tasks (builds missing zoo models)
    python examples/grafting.py --tasks sentiment          # one task at a time ...
    python examples/grafting.py --tasks topic --reuse      # ... and the rest, keeping the first
    python examples/grafting.py --quick                    # fewer points, for a smoke run

Writes benchmarks/results/grafting.json, grafting_curve.png and grafting_overlap.png
(grafting-adamw* with --optimizer adamw).
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
MODELS = {"sgd": {"sentiment": "sentiment-ft-sgd", "topic": "topic-ft-sgd"},
          "adamw": {"sentiment": "sentiment-ft-lr1e-4-s0", "topic": "topic-ft-lr1e-4-s0"}}
# the overlap also shows the same task fine-tuned from another seed, as a yardstick for "similar"
SEED1 = {"sgd": "sentiment-ft-sgd-s1", "adamw": "sentiment-ft-lr1e-4-s1"}
HEAD = r"^(classifier|bert\.pooler)\."  # trained from a random init by the zoo fine-tunes: taken whole


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optimizer", choices=sorted(MODELS), default="sgd", help="which zoo fine-tunes")
    ap.add_argument("--sparsities", default="1e-4,1e-3,1e-2,3e-2,0.1")
    ap.add_argument("--random-sparsities", default="0.03,0.1", help="control: random masks of the same size")
    ap.add_argument("--learn-sparsities", default="1e-3")
    ap.add_argument("--learn-train", type=int, default=32, help="training examples for the learned masks (few-shot)")
    ap.add_argument("--learn-steps", type=int, default=10)
    ap.add_argument("--learn-eval-every", type=int, default=2)
    ap.add_argument("--learn-lr", type=float, default=1e11,
                    help="the paper's 1e7 moves no mask entry here (AdamW deltas are small and uniform)")
    ap.add_argument("--overlap-sparsity", type=float, default=1e-2)
    ap.add_argument("--limit", type=int, default=300, help="score only this many test examples")
    ap.add_argument("--tasks", default="sentiment,topic", help="which tasks (the overlap needs both)")
    ap.add_argument("--reuse", action="store_true", help="keep the tasks already in --out (run tasks one at a time)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="default benchmarks/results/grafting[-adamw].json")
    args = ap.parse_args()
    models = MODELS[args.optimizer]
    overlap_models = {"sentiment": models["sentiment"], "sentiment-seed1": SEED1[args.optimizer],
                      "topic": models["topic"]}
    suffix = "" if args.optimizer == "sgd" else f"-{args.optimizer}"
    args.out = args.out or str(RESULTS / f"grafting{suffix}.json")
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
    base = _model("base")
    tasks = [t for t in args.tasks.split(",") if t]
    work = Path(tempfile.mkdtemp(prefix="grafting-"))
    results = {"command": " ".join(["python", "examples/grafting.py"] + sys.argv[1:]), "models": models,
               "split": "test", "limit": args.limit, "tasks": {}, "torch_threads": torch.get_num_threads()}
    t_start = time.perf_counter()
    if args.reuse and Path(args.out).is_file():
        results["tasks"] = json.loads(Path(args.out).read_text()).get("tasks", {})

    def acc(model_dir, task):
        return round(zoo.evaluate(model_dir, task, split="test", limit=args.limit), 4)

    try:
        for task in tasks:
            name = models[task]
            if task in results["tasks"]:
                continue
            ft = _model(name)
            r = {"finetuned": acc(ft, task), "graft": [], "learned": [], "random": []}
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
            for sp in [float(x) for x in args.random_sparsities.split(",") if x]:
                out, mask = work / f"{task}-random-{sp:g}", work / f"{task}-random-{sp:g}-mask"
                _random_mask(base, mask, sp, HEAD)
                graft(base, ft, out=out, mask=mask)
                r["random"].append({"sparsity": sp, "accuracy": acc(out, task)})
                print(f"{task}: random {sp:g}: {r['random'][-1]['accuracy']}", flush=True)
                shutil.rmtree(out)
            for sp in learn_sp:
                t0 = time.perf_counter()
                out = work / f"{task}-learned-{sp:g}"
                res = learn_mask(base, ft, f"zoo:{task}:{args.learn_train}", sparsity=sp, whole=HEAD, out=out,
                                 mask_out=work / f"{task}-learned-{sp:g}-mask", steps=args.learn_steps,
                                 lr=args.learn_lr, eval_every=args.learn_eval_every, seed=0)
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
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")  # per task: a later --reuse run resumes
            print(f"{task}: fine-tuned {r['finetuned']}, head only {r['head_only']}", flush=True)

        sp = args.overlap_sparsity
        if len(set(tasks) | set(results["tasks"])) < 2:
            results["seconds_last_run"] = round(time.perf_counter() - t_start, 1)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            _plot(results, Path(args.out).with_name(f"grafting{suffix}_curve.png"))
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
            print(f"wrote {args.out} (one task: no overlap)")
            return
        masks = []
        for label, name in overlap_models.items():
            p = work / f"{label}-{sp:g}-layers-mask"  # layers only: the dense head would inflate the overlap
            graft(base, _model(name), mask_out=p, sparsity=sp, whole=None)
            masks.append(p)
        rep = overlap(masks, labels=list(overlap_models))
        print(overlap_table(rep))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        overlap_heatmap(rep, Path(args.out).with_name(f"grafting{suffix}_overlap.png"))
        results["overlap"] = {"sparsity": sp, "labels": rep["labels"], "models": overlap_models,
                              "chance_jaccard": sp / (2 - sp),  # two independent random masks of density sp
                              "overall": rep["overall"],
                              "per_layer_jaccard": {g: v["jaccard"] for g, v in rep["per_layer"].items()}}
        results["seconds_last_run"] = round(time.perf_counter() - t_start, 1)
        _plot(results, Path(args.out).with_name(f"grafting{suffix}_curve.png"))
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}, {Path(args.out).with_name(f'grafting{suffix}_curve.png')}, {Path(args.out).with_name(f'grafting{suffix}_overlap.png')}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _random_mask(base, path, density: float, whole: str, seed: int = 0) -> None:
    """Each layer element selected with probability `density` (Philox, as DARE's masks), the head whole."""
    from weightops import ops
    from weightops.io.checkpoint import Checkpoint
    from weightops.sparse import write_mask
    from weightops.sparse.graft import eligible_names

    infos = Checkpoint(base).infos
    elig, wholes = eligible_names(infos, None, whole)
    thr = ops.drop_threshold(1 - density)
    entries = [(n, infos[n].shape, infos[n].dtype, None) for n in wholes]
    entries += [(n, infos[n].shape, infos[n].dtype,
                 ops.philox_keep_mask(ops.model_key(seed, 0, n), 0, infos[n].numel, thr).nonzero().flatten())
                for n in elig]
    write_mask(path, entries, {"method": {"name": "random", "density": density, "seed": seed}})


def _model(name: str) -> Path:
    """A zoo model: used as is when already built (zoo.get waits for the zoo's build lock), else built."""
    from weightops import zoo

    path = zoo.zoo_dir() / name
    return path if (path / "card.json").is_file() else zoo.get(name)


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
        if r.get("random"):
            ax.plot([g["sparsity"] for g in r["random"]], [g["accuracy"] for g in r["random"]], "x", color=c, ms=8,
                    label=f"{task}: random mask (control)")
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
