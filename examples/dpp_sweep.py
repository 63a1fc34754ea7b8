"""DARE vs DAREx-q vs magnitude pruning of a real fine-tune, drop rate 0.5 - 0.99.

The model: all-MiniLM-L6-v2 fine-tuned on the zoo's `sentiment` task
(weightops.zoo, built on demand). For each drop rate p it prunes the delta
with DARE (rescale 1/(1-p)), DAREx-q (q chosen per rate by the unlabelled
last-hidden-state proxy on 64 training texts, labels unused) and magnitude
(top-k |δ| per tensor), and reports test accuracy and the proxy. At p = 0.99
it adds DAREx-q with q chosen on validation accuracy and the analytic
per-layer q. The classifier head is kept unpruned, as the DAREx encoder code
does (`--keep classifier`).

Candidates are scored in memory (`weightops.dpp.inmemory.PrunedModel`, the
same code the streaming writer runs); the headline p = 0.99 models are then
written with `weightops.dpp.prune` and re-scored from disk as a check.

    python examples/dpp_sweep.py                 # ~10 min on 2 cores, after the zoo model is built
    python examples/dpp_sweep.py --rates 0.9,0.99 --seeds 1

Writes benchmarks/results/dpp_sweep.json and examples/output/dpp_sweep.png.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = "sentiment"
KEEP = "classifier"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="sentiment-ft-lr1e-4-s0", help="zoo fine-tune")
    ap.add_argument("--rates", default="0.5,0.7,0.8,0.9,0.95,0.98,0.99")
    ap.add_argument("--seeds", type=int, default=3, help="mask seeds per (method, rate); mean and min/max reported")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N test examples")
    ap.add_argument("--out-json", default=str(ROOT / "benchmarks/results/dpp_sweep.json"))
    ap.add_argument("--out-png", default=str(ROOT / "examples/output/dpp_sweep.png"))
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification

    import weightops.zoo as zoo
    from weightops.dpp.api import prune, select_q
    from weightops.dpp.inmemory import PrunedModel
    from weightops.dpp.prune import PruneParams
    from weightops.dpp.q_search import load_for_proxy, make_proxy
    from weightops.dpp.stats import delta_stats, recommend_dpp
    from weightops.zoo.runtime import deterministic
    from weightops.zoo.tasks import load_task

    torch.set_num_threads(2)
    base, ft = _zoo_path("base"), _zoo_path(args.model)
    rates = [float(x) for x in args.rates.split(",")]
    unlabelled = [t for t, _ in load_task(TASK)["train"][:64]]
    proxy_file = Path(tempfile.mkdtemp()) / "unlabelled.txt"
    proxy_file.write_text("\n".join(unlabelled) + "\n")

    def acc(model_or_dir, split="test"):
        return zoo.evaluate(model_or_dir, TASK, split, limit=args.limit)

    t0 = time.perf_counter()
    stats = delta_stats(base, ft)
    rec = recommend_dpp(stats, rate=0.99, unlabelled=True, validation=True)
    clf = AutoModelForSequenceClassification.from_pretrained(ft).eval()
    pm = PrunedModel(clf, base, ft)
    enc = load_for_proxy(ft, decoder=False)
    proxy = make_proxy(enc, ft, unlabelled, decoder=False)
    penc = PrunedModel(enc, base, ft)

    def score(rule, p, seed, **kw):
        params = PruneParams(rate=p, seed=seed, keep=KEEP, **kw)
        pm.apply(rule, params)
        penc.apply(rule, params)
        with deterministic():
            return acc(clf), proxy()

    res = {"model": args.model, "task": TASK, "keep": KEEP, "seeds": args.seeds, "limit": args.limit,
           "finetuned_test_acc": acc(ft), "base_test_acc": acc(base), "delta_stats": stats["model"],
           "recommendation": rec, "rates": rates, "runs": []}
    print(f"fine-tuned test acc {res['finetuned_test_acc']:.4f}, base {res['base_test_acc']:.4f}; "
          f"p99|δ| {stats['model']['p99']:.3g}, max|δ| {stats['model']['max_abs']:.3g}", flush=True)
    for p in rates:
        qsel = select_q(base, ft, p, q_by="proxy", proxy_data=str(proxy_file), keep=KEEP, seed=0)
        q = qsel[0]
        for seed in range(args.seeds):
            for rule, kw in (("dare", {}), ("darex-q", {"q": q}), ("magnitude", {})):
                if rule == "magnitude" and seed > 0:
                    continue  # deterministic
                a, pr = score(rule, p, seed, **kw)
                res["runs"].append({"method": rule, "rate": p, "seed": seed, "q": kw.get("q"), "test_acc": a, "proxy": pr})
                print(f"p={p:<5} {rule:<9} seed {seed} {'q=%.4f' % q if rule == 'darex-q' else '':<9} "
                      f"acc {a:.4f} proxy {pr:.4g}", flush=True)

    # p = 0.99 extras: q on validation accuracy, analytic per-layer q; then write + re-score from disk
    p = 0.99
    if p in rates:
        qv = select_q(base, ft, p, q_by="metric", metric=f"zoo:{TASK}:validation", keep=KEEP, seed=0)
        qa = select_q(base, ft, p, q_by="analytic", calib_data=str(proxy_file), proxy_data=str(proxy_file), keep=KEEP, seed=0)
        extra = {"q_by_metric": qv[0], "q_by_metric_log": qv[2], "analytic_eta": qa[2]["eta"],
                 "analytic_q_mean": qa[2]["q_mean"]}
        for seed in range(args.seeds):
            a, pr = score("darex-q", p, seed, q=qv[0])
            res["runs"].append({"method": "darex-q (validation q)", "rate": p, "seed": seed, "q": qv[0], "test_acc": a, "proxy": pr})
            a2, pr2 = score("darex-q", p, seed, q=1.0, q_map=qa[1])
            res["runs"].append({"method": "darex-q (analytic per-layer q)", "rate": p, "seed": seed, "q": qa[2]["q_mean"],
                                "test_acc": a2, "proxy": pr2})
            print(f"p=0.99 darex-q validation q={qv[0]:.4f} seed {seed}: acc {a:.4f}; analytic (eta {qa[2]['eta']:.2f}, "
                  f"mean q {qa[2]['q_mean']:.4f}): acc {a2:.4f}", flush=True)
        with tempfile.TemporaryDirectory() as d:
            q = next(r["q"] for r in res["runs"] if r["method"] == "darex-q" and r["rate"] == p and r["seed"] == 0)
            disk = {}
            for rule, kw in (("dare", {}), ("darex-q", {"q": q})):
                out = Path(d) / rule
                r = prune(base, ft, out=out, method=rule, rate=p, keep=KEEP, quiet=True, **kw)
                delta = prune(base, ft, out=Path(d) / f"{rule}-delta", method=rule, rate=p, keep=KEEP, quiet=True,
                              format="delta", **kw)
                disk[rule] = {"test_acc_from_disk": acc(out), "kept": r.kept, "total": r.total,
                              "model_bytes": r.bytes_written, "delta_bytes": delta.bytes_written}
            extra["written_p099_seed0"] = disk
            print("from disk (seed 0):", json.dumps(disk), flush=True)
        res["p099"] = extra
    res["seconds"] = round(time.perf_counter() - t0, 1)

    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(res, indent=2) + "\n")
    plot(res, Path(args.out_png))
    print(f"wrote {args.out_json} and {args.out_png} ({res['seconds']} s)")


def _zoo_path(name):
    """A built zoo model without taking the zoo's build lock (another process may be building others)."""
    import weightops.zoo as zoo
    from weightops.zoo.runtime import zoo_dir

    p = zoo_dir() / name
    return p if (p / "card.json").is_file() else zoo.get(name)


def _agg(res, method, key):
    xs, mean, lo, hi = [], [], [], []
    for p in res["rates"]:
        v = [r[key] for r in res["runs"] if r["method"] == method and r["rate"] == p]
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

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    styles = {"dare": ("DARE 1/(1-p)", "C3", "o"), "darex-q": ("DAREx-q (proxy q)", "C0", "s"),
              "magnitude": ("magnitude top-k", "C2", "^")}
    for ax, key, label in ((axes[0], "test_acc", "test accuracy"), (axes[1], "proxy", "mean |ΔH| last hidden state")):
        for m, (name, c, mk) in styles.items():
            xs, mean, lo, hi = _agg(res, m, key)
            ax.plot(xs, mean, marker=mk, color=c, label=name)
            if res["seeds"] > 1 and m != "magnitude":
                ax.fill_between(xs, lo, hi, color=c, alpha=0.15)
        ax.set_xlabel("drop rate p")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].axhline(res["finetuned_test_acc"], color="k", ls="--", lw=1, label="fine-tuned")
    axes[0].axhline(res["base_test_acc"], color="gray", ls=":", lw=1, label="base (probe head)")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Delta-parameter pruning of MiniLM fine-tuned on '{res['task']}' (zoo {res['model']})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
