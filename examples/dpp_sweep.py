"""DARE vs DAREx-q vs magnitude pruning of real fine-tunes, drop rate 0.5 - 0.99.

The models: all-MiniLM-L6-v2 fine-tuned on the zoo's `sentiment` task: the
zoo's own fine-tune (lr 1e-4, 80 steps) and, built here once with the same
recipe, fine-tunes at a larger learning rate and/or more steps (larger deltas). For each drop
rate p the delta is pruned with DARE (rescale 1/(1-p)), DAREx-q (q chosen per
rate by the unlabelled last-hidden-state proxy on 64 training texts, labels
unused) and magnitude (top-k |δ| per tensor); we report test accuracy and the
proxy. At p = 0.99 we add DAREx-q with q chosen on validation accuracy (by the
reference's two-stage grid and by our geometric grid, `--q-search log`) and
the analytic per-layer q (η tuned on the proxy). The classifier head is kept
unpruned, as the DAREx encoder code does (`--keep classifier`).

Candidates are scored in memory (`weightops.dpp.inmemory.PrunedModel`, the
same code the streaming writer runs); the p = 0.99 DARE and DAREx-q models
are then written with `weightops.dpp.prune()` (model and sparse delta) and
re-scored from disk as a check.

    python examples/dpp_sweep.py                       # both models (small and large deltas), 7 rates, 3 seeds
    python examples/dpp_sweep.py --models zoo:sentiment-ft-lr1e-4-s0 --rates 0.9,0.99 --seeds 1

Writes benchmarks/results/dpp_sweep.json and examples/output/dpp_sweep.png.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = "sentiment"
KEEP = "classifier"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="zoo:sentiment-ft-lr1e-4-s0,build:3e-4x1000",
                    help="comma-separated: zoo:<name> (a zoo fine-tune) or build:<lr>[x<steps>] (the zoo's sentiment "
                         "recipe at learning rate lr, 80 steps unless given; built once under "
                         "~/.cache/weightops/dpp-example)")
    ap.add_argument("--rates", default="0.5,0.7,0.8,0.9,0.95,0.98,0.99")
    ap.add_argument("--seeds", type=int, default=3, help="mask seeds per (method, rate); mean and min/max reported")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N test examples")
    ap.add_argument("--out-json", default=str(ROOT / "benchmarks/results/dpp_sweep.json"))
    ap.add_argument("--out-png", default=str(ROOT / "examples/output/dpp_sweep.png"))
    args = ap.parse_args()

    import torch

    from weightops.zoo.tasks import load_task

    torch.set_num_threads(2)
    rates = [float(x) for x in args.rates.split(",")]
    unlabelled = [t for t, _ in load_task(TASK)["train"][:64]]
    tmp = Path(tempfile.mkdtemp())
    proxy_file = tmp / "unlabelled.txt"
    proxy_file.write_text("\n".join(unlabelled) + "\n")
    t0 = time.perf_counter()
    out = {"task": TASK, "keep": KEEP, "seeds": args.seeds, "limit": args.limit, "rates": rates, "models": []}
    try:
        for spec in args.models.split(","):
            out["models"].append(sweep(spec, rates, args, unlabelled, proxy_file))
            out["seconds"] = round(time.perf_counter() - t0, 1)
            save(out, args)  # after each model, so a long run leaves results behind
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save(out, args) -> None:
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps({**out, "command": "python examples/dpp_sweep.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and not k.startswith("out"))},
        indent=2) + "\n")
    plot(out, Path(args.out_png))
    print(f"wrote {args.out_json} and {args.out_png} ({out['seconds']} s)", flush=True)


def sweep(spec: str, rates, args, unlabelled, proxy_file) -> dict:
    from transformers import AutoModelForSequenceClassification

    import weightops.zoo as zoo
    from weightops.dpp.api import prune, select_q
    from weightops.dpp.inmemory import PrunedModel
    from weightops.dpp.rules import PruneParams
    from weightops.dpp.q_search import load_for_proxy, make_proxy
    from weightops.dpp.stats import delta_stats, recommend_dpp
    from weightops.zoo.runtime import deterministic

    base, ft, label = _zoo_path("base"), *_model(spec)

    def acc(model_or_dir, split="test"):
        with deterministic():
            return zoo.evaluate(model_or_dir, TASK, split, limit=args.limit)

    stats = delta_stats(base, ft, exclude=KEEP)
    clf = AutoModelForSequenceClassification.from_pretrained(ft).eval()
    pm = PrunedModel(clf, base, ft)
    enc = load_for_proxy(ft, decoder=False)
    proxy = make_proxy(enc, ft, unlabelled, decoder=False)
    penc = PrunedModel(enc, base, ft)

    def score(rule, p, seed, **kw):
        params = PruneParams(rate=p, seed=seed, keep=KEEP, **kw)
        pm.apply(rule, params)
        penc.apply(rule, params)
        return acc(clf), proxy()

    res = {"model": label, "path": str(ft), "finetuned_test_acc": acc(ft), "base_test_acc": acc(base),
           "delta_stats": stats["model"], "recommendation_p099": recommend_dpp(stats, rate=0.99, unlabelled=True,
                                                                             validation=True), "runs": []}
    print(f"[{label}] fine-tuned test acc {res['finetuned_test_acc']:.4f}, base {res['base_test_acc']:.4f}; "
          f"p99|δ| {stats['model']['p99']:.3g}, max|δ| {stats['model']['max_abs']:.3g}", flush=True)
    for p in rates:
        q = select_q(base, ft, p, q_by="proxy", proxy_data=str(proxy_file), keep=KEEP, seed=0)[0]
        for seed in range(args.seeds):
            for rule, kw in (("dare", {}), ("darex-q", {"q": q}), ("magnitude", {})):
                if rule == "magnitude" and seed > 0:
                    continue  # deterministic
                a, pr = score(rule, p, seed, **kw)
                res["runs"].append({"method": rule, "rate": p, "seed": seed, "q": kw.get("q"), "test_acc": a, "proxy": pr})
                print(f"[{label}] p={p:<5} {rule:<9} seed {seed} {'q=%.4f' % q if rule == 'darex-q' else '':<9} "
                      f"acc {a:.4f} proxy {pr:.4g}", flush=True)
    p = 0.99
    if p in rates:
        qv = select_q(base, ft, p, q_by="metric", metric=f"zoo:{TASK}:validation:200", keep=KEEP, seed=0)
        qlog = select_q(base, ft, p, q_by="metric", metric=f"zoo:{TASK}:validation:200", keep=KEEP, seed=0, how="log")
        qa = select_q(base, ft, p, q_by="analytic", calib_data=str(proxy_file), proxy_data=str(proxy_file),
                      keep=KEEP, seed=0)
        extra = {"q_by_metric": qv[0], "q_by_metric_evaluated": qv[2]["evaluated"],
                 "q_by_metric_log": qlog[0], "q_by_metric_log_evaluated": qlog[2]["evaluated"], "analytic_eta": qa[2]["eta"],
                 "analytic_q_mean": qa[2]["q_mean"]}
        for seed in range(args.seeds):
            a, pr = score("darex-q", p, seed, q=qv[0])
            res["runs"].append({"method": "darex-q-validation", "rate": p, "seed": seed, "q": qv[0], "test_acc": a, "proxy": pr})
            al, prl = score("darex-q", p, seed, q=qlog[0])
            res["runs"].append({"method": "darex-q-validation-log", "rate": p, "seed": seed, "q": qlog[0], "test_acc": al,
                                "proxy": prl})
            a2, pr2 = score("darex-q", p, seed, q=1.0, q_map=qa[1])
            res["runs"].append({"method": "darex-q-analytic", "rate": p, "seed": seed, "q": qa[2]["q_mean"],
                                "test_acc": a2, "proxy": pr2})
            print(f"[{label}] p=0.99 darex-q validation q={qv[0]:.4f} seed {seed}: acc {a:.4f}; log-grid q={qlog[0]:.4f}: "
                  f"acc {al:.4f}; analytic "
                  f"(eta {qa[2]['eta']:.2f}, mean q {qa[2]['q_mean']:.4f}): acc {a2:.4f}", flush=True)
        with tempfile.TemporaryDirectory() as d:
            q = next(r["q"] for r in res["runs"] if r["method"] == "darex-q" and r["rate"] == p)
            disk = {}
            for rule, kw in (("dare", {}), ("darex-q", {"q": q})):
                r = prune(base, ft, out=Path(d) / rule, method=rule, rate=p, keep=KEEP, quiet=True, **kw)
                delta = prune(base, ft, out=Path(d) / f"{rule}-delta", method=rule, rate=p, keep=KEEP, quiet=True,
                              format="delta", **kw)
                disk[rule] = {"test_acc_from_disk": acc(Path(d) / rule), "kept": r.kept, "total": r.total,
                              "model_bytes": r.bytes_written, "delta_bytes": delta.bytes_written}
            extra["written_seed0"] = disk
            print(f"[{label}] p=0.99 written and re-scored from disk (seed 0): {json.dumps(disk)}", flush=True)
        res["p099"] = extra
    return res


def _zoo_path(name):
    """A built zoo model without taking the zoo's build lock (another process may be building others)."""
    import weightops.zoo as zoo
    from weightops.zoo.runtime import zoo_dir

    p = zoo_dir() / name
    return p if (p / "card.json").is_file() else zoo.get(name)


def _model(spec: str):
    kind, _, arg = spec.partition(":")
    if kind == "zoo":
        return _zoo_path(arg), arg
    if kind == "build":
        lr, _, steps = arg.partition("x")
        return build_finetune(float(lr), int(steps) if steps else None), f"sentiment-ft-lr{arg}"
    raise SystemExit(f"--models: unknown entry {spec!r} (zoo:<name> or build:<lr>[x<steps>])")


def build_finetune(lr: float, steps: int | None = None) -> Path:
    """The zoo's sentiment recipe (catalogue FT: batch 16, seed 0) at learning rate `lr`, `steps` steps (default 80)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from weightops.zoo import catalogue as C
    from weightops.zoo import train as T
    from weightops.zoo.evaluate import tokenizer_for
    from weightops.zoo.runtime import TOKENIZER_FILES, deterministic, zoo_dir
    from weightops.zoo.tasks import load_task

    steps = steps or C.FT["steps"]
    out = zoo_dir().parent / "dpp-example" / f"sentiment-ft-lr{lr:g}-steps{steps}"
    if (out / "model.safetensors").is_file():
        return out
    base = _zoo_path("base")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"building {out.name} (one-off) ...", flush=True)
    with deterministic():
        model = AutoModelForSequenceClassification.from_pretrained(base)
        hp = {k: v for k, v in C.FT.items()}
        T.finetune(model, tokenizer_for(base), load_task(TASK)["train"], steps=steps, lr=lr,
                   batch_size=hp["batch_size"], seed=0, weight_decay=hp["weight_decay"], warmup=hp["warmup"])
    with torch.no_grad():
        model.save_pretrained(tmp, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copyfile(base / f, tmp / f)
    tmp.rename(out)
    return out


def _agg(runs, method, key, rates):
    xs, mean, lo, hi = [], [], [], []
    for p in rates:
        v = [r[key] for r in runs if r["method"] == method and r["rate"] == p]
        if v:
            xs.append(p)
            mean.append(sum(v) / len(v))
            lo.append(min(v))
            hi.append(max(v))
    return xs, mean, lo, hi


def plot(res, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(res["models"])
    fig, axes = plt.subplots(n, 2, figsize=(9, 3.1 * n), dpi=80, squeeze=False)
    styles = {"dare": ("DARE 1/(1-p)", "C3", "o"), "darex-q": ("DAREx-q (proxy q)", "C0", "s"),
              "magnitude": ("magnitude top-k", "C2", "^")}
    for row, m in zip(axes, res["models"]):
        for ax, key, label in ((row[0], "test_acc", "test accuracy"), (row[1], "proxy", "mean |ΔH|, last hidden state")):
            for meth, (name, c, mk) in styles.items():
                xs, mean, lo, hi = _agg(m["runs"], meth, key, res["rates"])
                ax.plot(xs, mean, marker=mk, color=c, label=name, ms=4)
                if res["seeds"] > 1 and meth != "magnitude":
                    ax.fill_between(xs, lo, hi, color=c, alpha=0.15)
            ax.set_xlabel("drop rate p")
            ax.set_ylabel(label, fontsize=8)
            ax.grid(alpha=0.3)
        row[0].axhline(m["finetuned_test_acc"], color="k", ls="--", lw=1, label="fine-tuned")
        row[0].axhline(m["base_test_acc"], color="gray", ls=":", lw=1, label="base")
        row[0].set_title(f"{m['model']} (p99 |δ| {m['delta_stats']['p99']:.2g})", fontsize=9)
        row[1].set_yscale("log")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Delta-parameter pruning of MiniLM fine-tuned on '{res['task']}' (head kept)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
