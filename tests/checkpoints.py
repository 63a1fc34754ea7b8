"""Tiny checkpoints generated on the fly (no network, no hub), shared by every test package.

A module of its own, not conftest.py: several conftest.py files exist, and
`from checkpoints import ...` would pick whichever pytest imported first.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_BERT = dict(vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=40, max_position_embeddings=32, type_vocab_size=2, model_type="bert",
                 architectures=["BertModel"], pad_token_id=0, layer_norm_eps=1e-12, hidden_act="gelu")


def make_bert_state(seed: int, dtype=torch.float32, base: dict | None = None, scale: float = 0.02) -> dict:
    """A tiny BERT state dict; with `base`, a 'fine-tune' of it (base + small noise)."""
    g = torch.Generator().manual_seed(seed)
    if base is None:
        from transformers import BertConfig, BertModel

        torch.manual_seed(seed)
        cfg = BertConfig(**{k: v for k, v in TINY_BERT.items() if k not in ("model_type", "architectures")})
        sd = {k: v.detach().clone() for k, v in BertModel(cfg).state_dict().items()}
        return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    return {k: ((v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v.clone())
            for k, v in base.items()}


def write_model(path: Path, sd: dict, shards: int = 1) -> Path:
    """Save an HF-layout directory (config.json + one file or `shards` shards with an index)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_BERT))
    names = list(sd)
    if shards == 1:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(path / fn), metadata={"format": "pt"})
        weight_map.update({k: fn for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path
