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


# A Llama-shaped decoder (GQA, SwiGLU, untied head) small enough for unit tests; the
# hidden/intermediate sizes do not divide the engine's block sizes on purpose.
TINY_LLAMA = dict(vocab_size=96, hidden_size=40, intermediate_size=108, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=10, max_position_embeddings=64,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, model_type="llama",
                  architectures=["LlamaForCausalLM"], torch_dtype="bfloat16", hidden_act="silu",
                  bos_token_id=1, eos_token_id=2)


def llama_shapes(cfg: dict = TINY_LLAMA) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of LlamaForCausalLM's state dict, in its order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    out["model.norm.weight"] = (h,)
    if not cfg.get("tie_word_embeddings"):
        out["lm_head.weight"] = (v, h)
    return out


def make_llama_state(seed: int, base: dict | None = None, *, dtype=torch.bfloat16, delta: float = 3e-4,
                     cfg: dict = TINY_LLAMA) -> dict:
    """A Llama-shaped state dict as users merge them: weights ~N(0, 0.02), norms ~1, all in `dtype`.

    With `base`, a 'fine-tune': base + N(0, delta) computed in fp32 and rounded to `dtype`, so in
    bf16 most deltas are a few ulps and |delta| takes few distinct values (many exact ties).
    """
    g = torch.Generator().manual_seed(seed)
    if base is not None:
        return {k: (v.float() + delta * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
    out = {}
    for k, shape in llama_shapes(cfg).items():
        x = 1.0 + 0.05 * torch.randn(shape, generator=g) if k.endswith("norm.weight") else 0.02 * torch.randn(shape, generator=g)
        out[k] = x.to(dtype)
    return out


def write_model(path: Path, sd: dict, shards: int = 1, config: dict | None = None) -> Path:
    """Save an HF-layout directory (config.json + one file or `shards` shards with an index).

    `config` defaults to the tiny BERT's; pass TINY_LLAMA for make_llama_state's models."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or TINY_BERT))
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


def write_tokenizer(path: Path, added=(), special=(), size: int = 96) -> int:
    """A small BPE tokenizer (tokenizer.json + tokenizer_config.json, built offline with `tokenizers`) whose
    first `size` ids match TINY_LLAMA's vocabulary: <unk> <s> </s>, characters, then merged pairs; `added`
    (ordinary) and `special` added tokens follow, in that order. Returns the vocabulary size."""
    import string

    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.ascii_letters + string.digits + ".,!?'"))}
    merges = []
    for p in ("th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed",
              "is", "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io", "le"):
        if len(vocab) >= size:
            break
        vocab[p] = len(vocab)
        merges.append((p[0], p[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if added:
        tok.add_tokens(list(added))
    if special:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 64}))
    return tok.get_vocab_size()
