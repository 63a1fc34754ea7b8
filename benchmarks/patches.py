"""Patch benchmark on generated Llama-shaped checkpoints (the generator of benchmarks/merge.py).

    python benchmarks/patches.py                 # ~1.1B parameters, bf16
    python benchmarks/patches.py --size small

A PEFT-format LoRA adapter (r 16, alpha 32, q/k/v/o/gate/up/down of every layer) is
generated on `base`; `ft1` plays v2. Each command runs in a fresh process under
/usr/bin/time -v: patch create (from the adapter, and by SVD from `ft2` at rank 16),
patch check with the drift report, patch apply (model and --as-adapter), and for
comparison `weightops merge ADAPTER --base v2 --method task_arithmetic`, which computes
the same θv2 + ΔW through the adapter source. Records wall time, peak RSS and GB/s.
Results go to benchmarks/results/patches-<size>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import SIZES, dir_bytes, generate, llama_shapes, run_measured  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(root: Path, size: str, r: int = 16, alpha: int = 32) -> Path:
    import torch
    from safetensors.torch import save_file

    d = root / "adapter"
    if (d / "adapter_model.safetensors").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for name, shape in llama_shapes(*SIZES[size]):
        if name.split(".")[-2] in TARGETS:
            module = name[: -len(".weight")]
            tensors[f"base_model.model.{module}.lora_A.weight"] = (torch.randn(r, shape[1], generator=g) * 0.01).to(torch.bfloat16)
            tensors[f"base_model.model.{module}.lora_B.weight"] = (torch.randn(shape[0], r, generator=g) * 0.01).to(torch.bfloat16)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                       "target_modules": list(TARGETS)}))
    return d


def timed(label: str, args: list[str], out: Path | None) -> dict:
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    wall, rss_mib = run_measured([sys.executable, "-m", "weightops", *args, "-q"], label)
    row = {"step": label, "wall_s": round(wall, 2), "peak_rss_mib": round(rss_mib, 1),
           "command": "weightops " + " ".join(args)}
    manifest = out / "weightops.json" if out is not None else None
    if manifest is not None and manifest.exists():
        m = json.loads(manifest.read_text())
        if "bytes_read" in m and m.get("seconds"):
            row.update(loop_s=m["seconds"], gb_per_s=round((m["bytes_read"] + m["outputs"]["total_bytes"]) / m["seconds"] / 1e9, 3))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=SIZES, default="1b")
    ap.add_argument("--root", default=None, help="Where the generated checkpoints go (default: /tmp/weightops-bench-<size>).")
    ap.add_argument("--no-svd", action="store_true", help="Skip the SVD patch (a full SVD of every matrix).")
    args = ap.parse_args()
    root = Path(args.root or f"/tmp/weightops-bench-{args.size}")
    info = generate(root, args.size)
    ad = make_adapter(root, args.size)
    base, v2, ft = root / "base", root / "ft1", root / "ft2"
    rows = [
        timed("create from adapter", ["patch", "create", "--base", str(base), "--adapter", str(ad), "--out", str(root / "p"), "--force"], None),
        timed("check --from v1 (drift)", ["patch", "check", str(root / "p"), "--to", str(v2), "--from", str(base)], None),
        timed("apply", ["patch", "apply", str(root / "p"), "--to", str(v2), "--out", str(root / "o-apply")], root / "o-apply"),
        timed("apply --as-adapter", ["patch", "apply", str(root / "p"), "--to", str(v2), "--out", str(root / "o-ad"), "--as-adapter"], None),
        timed("merge adapter (task_arithmetic)", ["merge", str(ad), "--base", str(v2), "--method", "task_arithmetic",
                                                  "--out", str(root / "o-merge")], root / "o-merge"),
    ]
    if not args.no_svd:
        rows.append(timed("create by SVD, rank 16", ["patch", "create", "--base", str(base), "--finetuned", str(ft), "--rank", "16",
                                                     "--out", str(root / "p-svd"), "--force"], None))
    for d in ("o-apply", "o-ad", "o-merge"):
        shutil.rmtree(root / d, ignore_errors=True)
    out = {"size": args.size, "parameters": info["parameters"], "model_bytes": dir_bytes(base),
           "patch_bytes": (root / "p" / "patch.safetensors").stat().st_size, "rows": rows,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_at_end": os.getloadavg()},
           "command": "python benchmarks/patches.py" + (f" --size {args.size}" if args.size != "1b" else "")}
    path = Path(__file__).resolve().parent / "results" / f"patches-{args.size}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for r in rows:
        extra = f", {r['gb_per_s']} GB/s" if "gb_per_s" in r else ""
        print(f"{r['step']:<34} {r['wall_s']:>7.2f} s  peak RSS {r['peak_rss_mib']:>7.1f} MiB{extra}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
