"""weightops vs mergekit itself on the same YAML configs: how close are the tensors?

    python benchmarks/mergekit_parity.py --mergekit-python /tmp/mkvenv/bin/python
    # results: benchmarks/results/mergekit_parity.json

mergekit must live in its own environment so it never changes this one's
torch; the one measured here was made with
    python -m venv --system-site-packages /tmp/mkvenv
    /tmp/mkvenv/bin/pip install --no-deps mergekit==0.1.5 immutables==0.21
(it reuses the system torch, so nothing CUDA is pulled in).

Models: a small BertForSequenceClassification (hidden 64, 4 layers) made on
the fly, and fine-tunes of it (base + small noise), fp32 and written with
save_pretrained. Each config is run by `mergekit-yaml` (in that venv) and by
`weightops run` (the mergekit compatibility layer), and compared tensor by
tensor: the largest |difference| relative to the largest |value|, and the
fraction of elements that are bit-identical. DARE configs draw random masks
(mergekit: torch's generator; weightops: Philox), so they are expected to
differ; they are listed with that note.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

RESULTS = Path(__file__).resolve().parent / "results" / "mergekit_parity.json"


def make_models(root: Path, n_ft: int = 3) -> dict[str, str]:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=2)
    base = BertForSequenceClassification(cfg)
    base.save_pretrained(root / "base")
    out = {"base": str(root / "base")}
    sd = base.state_dict()
    for i in range(n_ft):
        g = torch.Generator().manual_seed(100 + i)
        m = BertForSequenceClassification(cfg)
        m.load_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                           for k, v in sd.items()})
        m.save_pretrained(root / f"ft{i}")
        out[f"ft{i}"] = str(root / f"ft{i}")
    return out


def configs(m: dict[str, str]) -> dict[str, dict]:
    b, a, c, d = m["base"], m["ft0"], m["ft1"], m["ft2"]
    two = lambda **p: [{"model": a, "parameters": dict(p, weight=0.6)}, {"model": c, "parameters": dict(p, weight=0.4)}]  # noqa: E731
    return {
        "linear": {"models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": c, "parameters": {"weight": 0.3}},
                              {"model": d, "parameters": {"weight": 0.5}}], "merge_method": "linear"},
        "task_arithmetic": {"models": two(), "merge_method": "task_arithmetic", "base_model": b,
                            "parameters": {"lambda": 0.8}},
        "ties": {"models": two(density=0.5), "merge_method": "ties", "base_model": b,
                 "parameters": {"normalize": True, "int8_mask": True}},
        "ties_normalize_false": {"models": two(density=0.5), "merge_method": "ties", "base_model": b,
                                 "parameters": {"normalize": False}},
        "ties_gradients": {"models": [{"model": a, "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                                      {"model": c, "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                                      {"model": d, "parameters": {"density": 0.33, "weight": [
                                          {"filter": "intermediate", "value": 0.5}, {"value": 0}]}}],
                           "merge_method": "ties", "base_model": b, "parameters": {"normalize": True}},
        "breadcrumbs": {"models": two(density=0.8, gamma=0.05), "merge_method": "breadcrumbs", "base_model": b},
        "slerp": {"models": [{"model": a}, {"model": c}], "merge_method": "slerp", "base_model": a,
                  "parameters": {"t": 0.3}},
        "slerp_gradient": {"models": [{"model": a}, {"model": c}], "merge_method": "slerp", "base_model": a,
                           "parameters": {"t": [{"filter": "attention", "value": [0, 0.5, 1]}, {"value": 0.5}]}},
        "model_stock": {"models": [{"model": a}, {"model": c}, {"model": d}], "merge_method": "model_stock",
                        "base_model": b},
        "dare_ties (random masks)": {"models": two(density=0.7), "merge_method": "dare_ties", "base_model": b},
    }


def load(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare(a: dict, b: dict) -> dict:
    common = sorted(set(a) & set(b))
    worst, worst_name, equal, total = 0.0, None, 0, 0
    for k in common:
        x, y = a[k].double(), b[k].double()
        if x.shape != y.shape or not x.is_floating_point():
            continue
        scale = max(x.abs().max().item(), 1e-12) if x.numel() else 1.0
        rel = (x - y).abs().max().item() / scale if x.numel() else 0.0
        if rel > worst:
            worst, worst_name = rel, k
        equal += int((a[k] == b[k]).sum())
        total += x.numel()
    return {"tensors_compared": len(common), "only_mergekit": sorted(set(a) - set(b)),
            "only_weightops": sorted(set(b) - set(a)), "max_rel_diff": worst, "worst_tensor": worst_name,
            "bit_identical_fraction": equal / total if total else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mergekit-python", default=os.environ.get("MERGEKIT_PYTHON", "/tmp/mkvenv/bin/python"))
    args = ap.parse_args()
    mk_yaml = Path(args.mergekit_python).parent / "mergekit-yaml"
    if not mk_yaml.exists():
        raise SystemExit(f"no mergekit-yaml next to {args.mergekit_python}; see this script's docstring")
    root = Path(tempfile.mkdtemp(prefix="mk-parity-"))
    models = make_models(root)
    version = subprocess.run([args.mergekit_python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                             capture_output=True, text=True).stdout.strip()
    rows = {}
    for name, cfg in configs(models).items():
        cfg = dict(cfg, dtype="float32")
        slug = name.split()[0]
        path = root / f"{slug}.yml"
        path.write_text(yaml.safe_dump(cfg))
        t = time.perf_counter()
        r = subprocess.run([str(mk_yaml), str(path), str(root / f"{slug}-mk"), "--quiet", "--random-seed", "0"],
                           capture_output=True, text=True)
        t_mk = time.perf_counter() - t
        if r.returncode != 0:
            rows[name] = {"mergekit_error": (r.stderr.strip().splitlines() or ["?"])[-1]}
            print(f"{name}: mergekit failed: {rows[name]['mergekit_error']}")
            continue
        t = time.perf_counter()
        w = subprocess.run([sys.executable, "-m", "weightops", "run", str(path), "--set", f"out={root / (slug + '-wo')}",
                            "--quiet"], capture_output=True, text=True)
        t_wo = time.perf_counter() - t
        if w.returncode != 0:
            rows[name] = {"weightops_error": w.stderr.strip().splitlines()[-1]}
            print(f"{name}: weightops failed: {rows[name]['weightops_error']}")
            continue
        rows[name] = {**compare(load(root / f"{slug}-mk"), load(root / f"{slug}-wo")),
                      "seconds_mergekit": round(t_mk, 2), "seconds_weightops": round(t_wo, 2)}
        r_ = rows[name]
        print(f"{name:<26} max rel diff {r_['max_rel_diff']:.3g}  bit-identical {r_['bit_identical_fraction']:.4f}  "
              f"({r_['tensors_compared']} tensors; worst {r_['worst_tensor']})", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": "python benchmarks/mergekit_parity.py", "mergekit_version": version,
                                   "models": "BertForSequenceClassification hidden 64, 4 layers; fp32",
                                   "results": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
