"""End-to-end merge benchmark on generated Llama-shaped checkpoints.

    python benchmarks/merge.py                      # ~1.1B parameters, bf16, 3 inputs
    python benchmarks/merge.py --size small --methods linear,ties

Generates a base and two "fine-tunes" (base + small noise) in HF layout
(sharded, bf16), then runs each method in a fresh process under
/usr/bin/time -v and records wall time, peak RSS (touched mmap pages count),
bytes read/written, achieved GB/s, and the ratio to the I/O limit: the time
to read the inputs and write an output of the same size on this machine,
measured in the same run. For dare_linear, dare_ties and ties (global) it
also runs the pure-torch reference kernels, for the native/reference ratio.
Results go to benchmarks/results/merge-<size>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # hidden, intermediate, layers, vocab, kv_heads, heads
    "1b": (2048, 5632, 22, 32000, 4, 32),  # TinyLlama-1.1B shapes
    "small": (512, 1408, 4, 8000, 2, 8),
}
METHODS = {
    "linear": [],
    "task_arithmetic": ["--lambda", "0.8"],
    "ties": ["--density", "0.2"],
    "ties_tensor": ["--method", "ties", "--density", "0.2", "--trim-scope", "tensor"],
    "dare_linear": ["--drop-rate", "0.9"],
    "dare_ties": ["--drop-rate", "0.9"],
    "breadcrumbs": [],
    "model_stock": [],
    "slerp": ["--t", "0.4"],
}
KERNEL_COMPARE = ("dare_linear", "dare_ties", "ties")


def llama_shapes(hidden, inter, layers, vocab, kv, heads):
    hd = hidden // heads
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "self_attn.q_proj.weight", (hidden, hidden)
        yield p + "self_attn.k_proj.weight", (kv * hd, hidden)
        yield p + "self_attn.v_proj.weight", (kv * hd, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, hidden)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def generate(root: Path, size: str, shard_bytes: int = 1 << 30) -> dict:
    import torch
    from safetensors.torch import save_file

    hidden, inter, layers, vocab, kv, heads = SIZES[size]
    shapes = list(llama_shapes(hidden, inter, layers, vocab, kv, heads))
    n_params = sum(math.prod(s) for _, s in shapes)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5,
              "max_position_embeddings": 2048, "tie_word_embeddings": False}
    for idx, name in enumerate(["base", "ft1", "ft2"]):
        d = root / name
        if (d / "model.safetensors.index.json").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        noise = torch.Generator().manual_seed(100 + idx)
        shard, used, k, weight_map = {}, 0, 0, {}

        def flush():
            nonlocal shard, used, k
            if shard:
                fn = f"model-{k + 1:05d}-of-XXXXX.safetensors"
                save_file(shard, str(d / fn), metadata={"format": "pt"})
                weight_map.update({n: fn for n in shard})
                shard, used, k = {}, 0, k + 1

        for tname, shape in shapes:
            w = torch.randn(shape, generator=g) * 0.02
            if idx:
                w += torch.randn(shape, generator=noise) * 0.002
            t = w.to(torch.bfloat16)
            if used + t.numel() * 2 > shard_bytes:
                flush()
            shard[tname] = t
            used += t.numel() * 2
        flush()
        total = k
        final = {}
        for n, fn in weight_map.items():
            new = fn.replace("XXXXX", f"{total:05d}")
            if not (d / new).exists():
                os.rename(d / fn, d / new)
            final[n] = new
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": final}))
        (d / "config.json").write_text(json.dumps(config))
    return {"parameters": n_params}


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.suffix == ".safetensors")


def io_limit(root: Path, out_bytes: int) -> float:
    """Seconds to read the three inputs (as the merge will: from the page cache once warm) and write+fsync out_bytes."""
    t = time.perf_counter()
    for name in ("base", "ft1", "ft2"):
        for f in sorted((root / name).glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.read(64 << 20):
                    pass
    t_read = time.perf_counter() - t
    t = time.perf_counter()
    chunk = b"\0" * (64 << 20)
    with open(root / "io-probe.bin", "wb") as fh:
        left = out_bytes
        while left > 0:
            fh.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    t_write = time.perf_counter() - t
    os.remove(root / "io-probe.bin")
    return t_read + t_write


def run_measured(cmd: list[str], label: str) -> tuple[float, float]:
    """Run cmd under /usr/bin/time -v; (wall seconds, peak RSS MiB), or exit with its stderr."""
    t = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{label} failed:\n{res.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    return wall, rss_kb / 1024


def run_one(root: Path, label: str, extra: list[str], kernels: str) -> dict:
    method = label if "--method" not in extra else None
    out = root / f"out-{label}-{kernels}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "weightops", "merge", str(root / "ft1"), str(root / "ft2"), "--base", str(root / "base"),
           "--out", str(out), "--kernels", kernels, "-q"] + (["--method", method] if method else []) + extra
    wall, rss_mib = run_measured(cmd, label)
    man = json.loads((out / "weightops.json").read_text())
    written = man["outputs"]["total_bytes"]
    row = {"method": label, "kernels": man["kernels"], "wall_s": round(wall, 2), "merge_s": man["seconds"],
           "peak_rss_mib": round(rss_mib, 1), "bytes_read": man["bytes_read"], "bytes_written": written,
           "gb_per_s": round((man["bytes_read"] + written) / man["seconds"] / 1e9, 3), "command": " ".join(cmd[1:])}
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=SIZES, default="1b")
    ap.add_argument("--root", default=None, help="where checkpoints are generated (default: benchmarks/.data/<size>)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-kernel-compare", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    here = Path(__file__).resolve().parent
    root = Path(args.root or here / ".data" / args.size)
    root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    info = generate(root, args.size)
    print(f"checkpoints ready in {time.perf_counter() - t:.1f} s under {root}", file=sys.stderr)
    in_bytes = sum(dir_bytes(root / n) for n in ("base", "ft1", "ft2"))
    out_bytes = dir_bytes(root / "base")
    io_limit(root, out_bytes)  # warm the page cache the way the merges will find it
    limit = io_limit(root, out_bytes)
    help_t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "weightops", "--help"], capture_output=True)
    help_s = time.perf_counter() - help_t
    rows = []
    for label in args.methods.split(","):
        kernels = ["native", "reference"] if (label in KERNEL_COMPARE and not args.no_kernel_compare) else ["auto"]
        for k in kernels:
            row = run_one(root, label, METHODS[label], k)
            row["x_io_limit"] = round(row["merge_s"] / limit, 2)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    ratios = {}
    for label in KERNEL_COMPARE:
        r = {x["kernels"]: x["merge_s"] for x in rows if x["method"] == label}
        if "native" in r and "reference" in r:
            ratios[label] = round(r["reference"] / r["native"], 2)
    result = {
        "size": args.size, "parameters": info["parameters"], "input_bytes": in_bytes, "output_bytes": out_bytes,
        "io_limit_s": round(limit, 2), "help_s": round(help_s, 3), "native_speedup": ratios, "rows": rows,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_at_end": os.getloadavg()},
        "command": "python benchmarks/merge.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out or here / "results" / f"merge-{args.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    width = max(len(r["method"]) for r in rows)
    print(f"{'method':<{width}}  kernels    merge_s  x_io  peak_RSS_MiB  GB/s")
    for r in rows:
        print(f"{r['method']:<{width}}  {r['kernels']:<9} {r['merge_s']:>8.2f} {r['x_io_limit']:>5.2f} {r['peak_rss_mib']:>13.1f} {r['gb_per_s']:>5.2f}")
    print(f"I/O limit {limit:.2f} s; native/reference speedup {ratios}; weightops --help {help_s:.2f} s")


if __name__ == "__main__":
    main()
