"""Helpers for the intruder tests: planted intruders, BERT-like layouts, PEFT-layout adapters."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

MODULES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")


def orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def spectral_matrix(m: int, n: int, g: torch.Generator, decay: float = 0.5):
    """W0 = U diag(s) Vᵀ with s_i = i^-decay (well separated top singular values, like trained weights)."""
    d = min(m, n)
    U, V = orthogonal(m, g)[:, :d], orthogonal(n, g)[:, :d]
    s = torch.arange(1, d + 1, dtype=torch.float32) ** -decay
    return (U * s) @ V.T, U, s, V


def spread_direction(U: torch.Tensor, skip: int, g: torch.Generator) -> torch.Tensor:
    """A unit vector spread over the base's left singular vectors skip.. (orthogonal to its top `skip`)."""
    c = torch.randn(U.shape[1] - skip, generator=g)
    u = U[:, skip:] @ c
    return u / u.norm()


def layer_shapes(h: int, inter: int) -> dict[str, tuple[int, int]]:
    return {"attention.self.query": (h, h), "attention.self.key": (h, h), "attention.self.value": (h, h),
            "attention.output.dense": (h, h), "intermediate.dense": (inter, h), "output.dense": (h, inter)}


def bert_like(layers: int, h: int, inter: int, seed: int) -> dict[str, torch.Tensor]:
    """A BERT-shaped state dict (analysed weights plus biases, norms, embeddings that must be skipped)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"embeddings.word_embeddings.weight": torch.randn(50, h, generator=g) * 0.02}
    for i in range(layers):
        for mod, shape in layer_shapes(h, inter).items():
            sd[f"encoder.layer.{i}.{mod}.weight"] = spectral_matrix(*shape, g)[0]
            sd[f"encoder.layer.{i}.{mod}.bias"] = torch.zeros(shape[0])
        sd[f"encoder.layer.{i}.output.LayerNorm.weight"] = torch.ones(h)
    sd["pooler.dense.weight"] = torch.randn(h, h, generator=g) * 0.02
    sd["classifier.weight"] = torch.randn(2, h, generator=g) * 0.02
    return sd


def save_ckpt(path: Path, sd: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text("{}")
    return path


def save_adapter(path: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, alpha: float,
                 rslora: bool = False, dtype=torch.float32) -> Path:
    """A PEFT-layout LoRA adapter: factors[name] = (B m×r, A r×n) for base tensor `name`."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (B, A) in factors.items():
        stem = "base_model.model." + name[: -len(".weight")]
        tensors[f"{stem}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"{stem}.lora_B.weight"] = B.to(dtype).contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = sorted({n.split(".")[-2] for n in factors})
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                          "use_rslora": rslora, "target_modules": targets}))
    return path


def lora_scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r
