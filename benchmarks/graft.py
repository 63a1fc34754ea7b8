"""Time and peak RSS of `weightops graft` (mask + grafted model) against the in-memory reference.

Synthetic bf16 checkpoints (a base and a fine-tune, `--layers` blocks of four
`--width`² matrices), graft at `--sparsity` with the default block size. Each
run is a fresh subprocess, so its peak RSS is its own. Results go to
benchmarks/results/graft.json.

    python benchmarks/graft.py --layers 8 --width 2048      # 2 x 268 MB checkpoints
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

REFERENCE = r"""
import sys, torch
from safetensors.torch import load_file
from weightops.sparse.reference import top_delta_mask
b, f, k = load_file(sys.argv[1] + "/model.safetensors"), load_file(sys.argv[2] + "/model.safetensors"), int(sys.argv[3])
names = [n for n in b if ".layers." in n]
m = top_delta_mask(b, f, names, k)
print(sum(int(v.sum()) for v in m.values()))
"""


def _make(path: Path, layers: int, width: int, seed: int, base=None):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(layers):
        for m in ("q", "k", "v", "o"):
            n = f"model.layers.{i}.{m}.weight"
            sd[n] = (torch.randn(width, width, generator=g) * 0.02).to(torch.bfloat16) if base is None else \
                (base[n].float() + 1e-3 * torch.randn(width, width, generator=g)).to(torch.bfloat16)
    sd["model.embed.weight"] = torch.zeros(1000, width, dtype=torch.bfloat16) if base is None else base["model.embed.weight"]
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"))
    return sd


def _run(cmd: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS MB, stdout) of one subprocess, peak RSS from GNU time."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], check=True, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    kb = next(int(line.split(":")[1]) for line in p.stderr.splitlines() if "Maximum resident set size" in line)
    return secs, kb / 1024, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--sparsity", type=float, default=1e-4)
    ap.add_argument("--which", default="graft,reference")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "graft.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = _make(tmp / "base", args.layers, args.width, 0)
        _make(tmp / "ft", args.layers, args.width, 1, base)
        del base
        n_elig = args.layers * 4 * args.width ** 2
        k = round(args.sparsity * n_elig)
        res = {"layers": args.layers, "width": args.width, "dtype": "bfloat16", "eligible": n_elig, "k": k,
               "checkpoint_mb": round((tmp / "base" / "model.safetensors").stat().st_size / 1e6, 1), "runs": {}}
        for which in args.which.split(","):
            if which == "graft":
                cmd = [sys.executable, "-m", "weightops", "graft", "-b", str(tmp / "base"), "-f", str(tmp / "ft"),
                       "--k", str(k), "--out", str(tmp / "g"), "--mask-out", str(tmp / "m"), "-q"]
            else:
                cmd = [sys.executable, "-c", REFERENCE, str(tmp / "base"), str(tmp / "ft"), str(k)]
            secs, rss, _ = _run(cmd)
            res["runs"][which] = {"seconds": round(secs, 2), "peak_rss_mb": round(rss, 1)}
            print(which, res["runs"][which], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
