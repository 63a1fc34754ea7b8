"""Whole-tensor references for patches, straight from the definitions (tests hold the streaming code to them).

apply:  θ = θv2 + s·ΔW with ΔW = scale·B@A (transposed for embedding / fan_in_fan_out
        factors), ΔW = delta for dense entries, θ = value for value entries.
svd:    the best rank-r approximation of δ, U_r·diag(σ_r)·V_rᵀ, in float64.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def patch_deltas(patch_dir) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (kind, ΔW or value) read with stock safetensors, whole tensors, float64."""
    from safetensors.torch import load_file

    patch_dir = Path(patch_dir)
    meta = json.loads((patch_dir / "patch.json").read_text())
    t = load_file(str(patch_dir / "patch.safetensors"))
    out = {}
    for name, e in meta["entries"].items():
        if e["kind"] == "lowrank":
            d = e["scale"] * (t[name + ".lora_B"].double() @ t[name + ".lora_A"].double())
            out[name] = ("delta", d.T if e["layout"] != "linear" else d)
        elif e["kind"] == "dense":
            out[name] = ("delta", t[name + ".delta"].double())
        else:
            out[name] = ("value", t[name + ".value"])
    return out


def apply(v2: dict, patch_dir, scale: float = 1.0, mapping: dict | None = None) -> dict:
    out = {k: v.clone() for k, v in v2.items()}
    for name, (kind, x) in patch_deltas(patch_dir).items():
        tgt = (mapping or {}).get(name, name)
        dt = v2[tgt].dtype
        out[tgt] = x.to(dt) if kind == "value" else (v2[tgt].double() + scale * x).to(dt)
    return out


def svd_truncate(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]
