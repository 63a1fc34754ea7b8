"""Read-only looks at checkpoints: inspect, diff, verify."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from weightops.errors import CheckpointError, WeightopsError
from weightops.io.checkpoint import INDEX_NAME, Checkpoint, is_adapter_dir
from weightops.io.safetensors_file import SafetensorsFile

_BLOCK = 1 << 22


def inspect(path, base=None) -> dict:
    """Tensors, shapes, dtypes, sizes and parameter count of a checkpoint or LoRA adapter."""
    if is_adapter_dir(path):
        from weightops.io.adapter import LoraAdapter

        if base is None:
            f = SafetensorsFile(Path(path) / "adapter_model.safetensors")
            cfg = json.loads((Path(path) / "adapter_config.json").read_text())
            tensors = [{"name": n, "dtype": str(i.dtype)[6:], "shape": list(i.shape), "bytes": i.nbytes} for n, i in f.tensors.items()]
            return {"path": str(path), "kind": "lora", "config": {k: cfg.get(k) for k in
                    ("r", "lora_alpha", "use_rslora", "target_modules", "modules_to_save", "rank_pattern", "alpha_pattern")},
                    "tensors": tensors, "parameters": sum(math.prod(t["shape"]) for t in tensors),
                    "bytes": sum(t["bytes"] for t in tensors)}
        ad = LoraAdapter(path, Checkpoint(base))
        return {"path": str(path), "kind": "lora", "base": str(base),
                "config": {"r": ad.config.get("r"), "lora_alpha": ad.config.get("lora_alpha"), "use_rslora": ad.config.get("use_rslora", False)},
                "adapted": [{"name": n, "rank": f.rank, "alpha": f.alpha, "scale": f.scale, "shape": list(ad.infos[n].shape)} for n, f in ad.factors.items()],
                "replaced": sorted(ad.replaced), "parameters": sum(i.numel for i in ad.file.tensors.values()), "bytes": ad.file.size}
    ck = Checkpoint(path)
    tensors = [{"name": n, "dtype": str(i.dtype)[6:], "shape": list(i.shape), "bytes": i.nbytes, "file": i.file.path.name}
               for n, i in ck.infos.items()]
    by_dtype: dict[str, int] = {}
    for t, i in zip(tensors, ck.infos.values()):
        by_dtype[t["dtype"]] = by_dtype.get(t["dtype"], 0) + i.numel
    return {"path": str(path), "kind": "checkpoint", "files": [str(f.path.name) for f in ck.files], "tensors": tensors,
            "parameters": sum(i.numel for i in ck.infos.values()), "parameters_by_dtype": by_dtype,
            "bytes": sum(f.size for f in ck.files)}


def diff(a, b, base=None) -> dict:
    """Per-tensor statistics of δ = B − A: L2, cosine(A, B), max |δ|, fraction of elements changed.

    B may be a LoRA adapter; then A is its base.
    """
    from weightops.io.checkpoint import open_source

    src_a = Checkpoint(a)
    src_b = open_source(b, src_a)
    rows, missing = [], sorted(set(src_a.infos) ^ set(src_b.infos))
    for name, ia in src_a.infos.items():
        ib = src_b.infos.get(name)
        if ib is None or not ia.is_float:
            continue
        if tuple(ia.shape) != tuple(ib.shape):
            raise WeightopsError(f"'{name}' is {list(ia.shape)} in {a} but {list(ib.shape)} in {b}")
        sq = dot = na = nb = 0.0
        mx, changed = 0.0, 0
        for s in range(0, ia.numel, _BLOCK):
            e = min(ia.numel, s + _BLOCK)
            xa, xb = src_a.read(name, s, e).double(), src_b.read(name, s, e).double()
            d = xb - xa
            sq += float(d.square().sum())
            dot += float(xa @ xb)
            na += float(xa.square().sum())
            nb += float(xb.square().sum())
            if d.numel():
                mx = max(mx, float(d.abs().max()))
            changed += int((d != 0).sum())
            src_a.release(name, s, e)
            src_b.release(name, s, e)
        cos = dot / math.sqrt(na * nb) if na > 0 and nb > 0 else float("nan")
        rows.append({"name": name, "numel": ia.numel, "l2": math.sqrt(sq), "rel_l2": math.sqrt(sq / na) if na > 0 else float("nan"),
                     "cosine": cos, "max_abs": mx, "changed": changed / ia.numel if ia.numel else 0.0})
    total_sq = sum(r["l2"] ** 2 for r in rows)
    return {"a": str(a), "b": str(b), "tensors": rows, "total_l2": math.sqrt(total_sq), "only_in_one": missing}


def verify(path) -> dict:
    """Re-hash every output tensor and compare with the manifest; checks the index too."""
    from weightops.engine import load_manifest

    manifest = load_manifest(path)
    try:
        ck = Checkpoint(path)
    except CheckpointError as e:
        return {"ok": False, "problems": [str(e)]}
    problems = []
    want = manifest.get("outputs", {}).get("tensors", {})
    stored = ck.raw_infos  # the bytes as written (FP8 weights and their scales, not dequantized)
    for name in sorted(set(want) - set(stored)):
        problems.append(f"tensor '{name}' is in the manifest but not in the checkpoint")
    for name in sorted(set(stored) - set(want)):
        problems.append(f"tensor '{name}' is in the checkpoint but not in the manifest")
    for name, info in stored.items():
        if name not in want:
            continue
        h = hashlib.sha256()
        for s in range(0, info.numel, _BLOCK):
            e = min(info.numel, s + _BLOCK)
            x = info.file.read(info, s, e)
            h.update(x.contiguous().view(torch.uint8).numpy() if x.numel() else b"")
            info.file.release(info, s, e)
        if h.hexdigest() != want[name]["sha256"]:
            problems.append(f"tensor '{name}': sha256 differs from the manifest")
        if list(info.shape) != want[name]["shape"] or str(info.dtype)[6:] != want[name]["dtype"]:
            problems.append(f"tensor '{name}': shape/dtype differ from the manifest")
    shards = manifest.get("outputs", {}).get("shards", [])
    present = [f.path.name for f in ck.files]
    if sorted(shards) != sorted(present):
        problems.append(f"shards {present} differ from the manifest's {shards}")
    if len(shards) > 1 and not (Path(path) / INDEX_NAME).is_file():
        problems.append(f"{INDEX_NAME} is missing")
    return {"ok": not problems, "problems": problems, "tensors": len(stored), "method": manifest.get("method")}
