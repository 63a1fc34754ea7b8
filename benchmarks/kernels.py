"""Throughput of the weightops kernels: native vs pure-torch reference vs the
naive torch formulation (torch.bernoulli + mul for DARE, torch.kthvalue for the
exact magnitude threshold).

    python benchmarks/kernels.py                 # 1M, 4M, 16M, 64M elements
    python benchmarks/kernels.py --big           # also 256M (needs ~10 GB of RAM)
    python benchmarks/kernels.py --sizes 1M,4M --out /tmp/k.json

Writes benchmarks/results/kernels.json. GB/s counts the bytes a kernel must
touch (every input read once, the output written once); the memory bandwidth
line is torch.add(a, b, out=c) on fp32, the best streaming figure torch itself
reaches on this machine, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import weightops.ops as ops
from weightops.ops import _ext

P_DROP = 0.9
K_MODELS = 2
BLOCK = 4 << 20  # elements per block in the engine-style run


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
    return int(float(s.rstrip("KMG")) * mult)


def timeit(fn, budget_s: float = 3.0, max_reps: int = 5) -> float:
    """Best wall time of a few runs after one warm-up (one run only if it is slow)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    best, spent, reps = first, first, 1
    while reps < max_reps and spent + best < budget_s:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best


def with_kernels(mode, fn):
    def run():
        ops.use_kernels(mode)
        return fn()
    return run


def naive_dare(base, models, weights, p):
    """How DARE is usually written in torch: a Bernoulli mask per model."""
    b = base.float()
    m = torch.zeros_like(b)
    for w, x in zip(weights, models):
        d = x.float() - b
        keep = torch.bernoulli(torch.full_like(d, 1.0 - p))
        m += w * d * keep / (1.0 - p)
    return (b + m).to(base.dtype)


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "extension": _ext.status()["reason"], "loadavg_at_end": os.getloadavg(),
            "cpu_isa": torch.ops.weightops._cpu_isa("") if _ext.load() else None,
            # torch's allocator hands large outputs out in huge pages with this set; page faults
            # on fresh outputs otherwise dominate above ~16M elements (for every implementation).
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "")}
    if _ext.load():
        info["build"] = torch.ops.weightops._build_info()
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1M,4M,16M,64M")
    ap.add_argument("--big", action="store_true", help="add 256M elements")
    ap.add_argument("--reference-max", default="4M", help="largest size for the (slow) pure-torch reference")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "kernels.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [parse_size(s) for s in args.sizes.split(",")] + ([256 << 20] if args.big else [])
    ref_max = parse_size(args.reference_max)
    dtype = getattr(torch, args.dtype)
    if not _ext.load():
        raise SystemExit(f"native extension unavailable: {_ext.status()['reason']}")

    rows, checks = [], []
    load0 = os.getloadavg()
    bw_n = 64 << 20
    a, b, c = torch.randn(bw_n), torch.randn(bw_n), torch.empty(bw_n)
    bandwidth = 12 * bw_n / timeit(lambda: torch.add(a, b, out=c)) / 1e9
    del a, b, c
    print(f"memory bandwidth (torch.add fp32, out=): {bandwidth:.1f} GB/s, threads={torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")

    def record(kernel, impl, n, nbytes, seconds, **extra):
        row = dict(kernel=kernel, impl=impl, n=n, dtype=args.dtype, seconds=seconds, melem_per_s=n / seconds / 1e6,
                   gb_per_s=nbytes / seconds / 1e9, **extra)
        rows.append(row)
        print(f"{kernel:<13} {impl:<16} n={n:>11,} {seconds * 1e3:9.1f} ms {row['melem_per_s']:9.1f} Melem/s "
              f"{row['gb_per_s']:7.2f} GB/s")
        return row

    esize = torch.empty(0, dtype=dtype).element_size()
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        base = torch.randn(n, generator=g).to(dtype)
        models = [(base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype) for _ in range(K_MODELS)]
        weights = [1.0 / K_MODELS] * K_MODELS
        keys = [ops.model_key(0, i, "bench") for i in range(K_MODELS)]
        thr = ops.drop_threshold(P_DROP)
        merge_bytes = (K_MODELS + 2) * n * esize

        dare = lambda: ops.delta_merge(base, models, weights, keys=keys, drop_threshold=thr,
                                       rescales=[1 / (1 - P_DROP)] * K_MODELS)
        ties = lambda: ops.delta_merge(base, models, weights, lo=[0.005] * K_MODELS, consensus="ties")
        wsum = lambda: ops.weighted_sum(models, weights)
        impls = ["native"] + (["reference"] if n <= ref_max else [])

        dare_native = None
        for impl in impls:
            r = record("dare", impl, n, merge_bytes, timeit(with_kernels(impl, dare)))
            dare_native = dare_native or r
        if n > BLOCK:
            # How the streaming engine calls it: 4M-element blocks with their global offsets. Each
            # output then fits the allocator's reused heap, where a whole-tensor output is a fresh
            # mmap whose page faults cost as much as the kernel (see machine.THP_MEM_ALLOC_ENABLE).
            def dare_blocked():
                for s in range(0, n, BLOCK):
                    ops.delta_merge(base[s:s + BLOCK], [m[s:s + BLOCK] for m in models], weights, offset=s,
                                    keys=keys, drop_threshold=thr, rescales=[1 / (1 - P_DROP)] * K_MODELS)
            record("dare", "native-4M-blocks", n, merge_bytes, timeit(with_kernels("native", dare_blocked)))

            def ta_blocked():  # the same loop without drops: what the tile loops cost without the generator
                for s in range(0, n, BLOCK):
                    ops.delta_merge(base[s:s + BLOCK], [m[s:s + BLOCK] for m in models], weights, offset=s)
            record("task_arith", "native-4M-blocks", n, merge_bytes, timeit(with_kernels("native", ta_blocked)))
        naive = record("dare", "bernoulli", n, merge_bytes, timeit(lambda: naive_dare(base, models, weights, P_DROP)))
        dare_native.update(speedup_vs_bernoulli=naive["seconds"] / dare_native["seconds"],
                           fraction_of_bandwidth=dare_native["gb_per_s"] / bandwidth)
        for impl in impls:
            record("ties", impl, n, merge_bytes, timeit(with_kernels(impl, ties)))
            record("weighted_sum", impl, n, (K_MODELS + 1) * n * esize, timeit(with_kernels(impl, wsum)))

        # Exact k-th largest |x - base| (the magnitude-trim threshold) at density 10%, on an fp32
        # fine-tune so the deltas are not bf16-quantised into a few values (that would make ties easy).
        k = max(1, n // 10)
        ft = base.float() + 0.01 * torch.randn(n, generator=g)
        stream = lambda: [(ft, base)]
        got = {}
        for impl in impls:
            ops.use_kernels(impl)
            got[impl] = ops.kth_largest_abs(stream, [k])[0]
            record("threshold", impl, n, (4 + esize) * n,
                   timeit(with_kernels(impl, lambda: ops.kth_largest_abs(stream, [k]))))
        kv = lambda: torch.kthvalue((ft - base.float()).abs(), n - k + 1).values.item()
        want = kv()
        naive = record("threshold", "kthvalue", n, (4 + esize) * n, timeit(kv))
        thr_native = next(r for r in rows if r["kernel"] == "threshold" and r["impl"] == "native" and r["n"] == n)
        thr_native.update(speedup_vs_kthvalue=naive["seconds"] / thr_native["seconds"])
        checks.append(dict(n=n, k=k, kthvalue=want, **{f"kth_{i}": v for i, v in got.items()},
                           identical=all(v == want for v in got.values())))
        print(f"  threshold check n={n:,}: kthvalue={want!r} native={got['native']!r} identical={checks[-1]['identical']}")
        del base, models, ft
    ops.use_kernels("auto")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(command="python benchmarks/kernels.py " + " ".join(sys.argv[1:]), machine=machine(),
                       loadavg_at_start=load0, bandwidth_gb_per_s=bandwidth, p_drop=P_DROP, models=K_MODELS,
                       results=rows, threshold_checks=checks), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
