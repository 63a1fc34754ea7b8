"""Where a tensor sits in a model's stack of layers: the rule behind slices and gradients.

A tensor belongs to layer N when its name has a component `<stack>.N.` with
`<stack>` one of `layers`, `layer`, `h`, `blocks`, `block` (Llama, Mistral, Qwen,
Gemma, Phi: `model.layers.N.`; BERT: `encoder.layer.N.`; GPT-2, Falcon:
`transformer.h.N.`); the first such component counts. Tensors with no layer index
are *embeddings* when their name contains `embed`, `wte` or `wpe` (they come
before the layers: `model.embed_tokens`, `transformer.wte`), and *head* tensors
otherwise (the final norm, `lm_head`, a classifier: they come after). A model's
layer count is `num_hidden_layers` (or `n_layer`, `num_layers`) of its
config.json, else one more than the largest index found.

A tensor's rows are the *vocabulary* (one row per token: what `tokenizer_source` aligns)
when it has no layer index and its name ends in `embed_tokens`, `word_embeddings`,
`wte`, `embed_in`, `embed_out`, `lm_head` or `shared` followed by `.weight` or `.bias`
(Llama/Mistral/Qwen `model.embed_tokens.weight` and `lm_head.weight`, BERT
`embeddings.word_embeddings.weight`, GPT-2 `transformer.wte.weight`, GPT-NeoX
`gpt_neox.embed_in.weight` and `embed_out.weight`, T5 `shared.weight`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
EMBEDDING = re.compile(r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
VOCABULARY = re.compile(r"(?:^|\.)(?:embed_tokens|word_embeddings|wte|embed_in|embed_out|lm_head|shared)\.(?:weight|bias)$")


def layer_of(name: str) -> int | None:
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def renumber(name: str, new_index: int) -> str:
    """`name` with its layer index replaced by `new_index`."""
    m = LAYER.search(name)
    if m is None:
        raise ValueError(f"{name} has no layer index")
    return name[: m.start(1)] + str(new_index) + name[m.end(1):]


def suffix(name: str) -> str:
    """The name with its layer index blanked, to pair the same tensor of different layers."""
    m = LAYER.search(name)
    return name if m is None else name[: m.start(1)] + "{}" + name[m.end(1):]


def is_embedding(name: str) -> bool:
    return layer_of(name) is None and EMBEDDING.search(name) is not None


def is_vocabulary(name: str) -> bool:
    """The tensor's rows are tokens (see the module doc)."""
    return layer_of(name) is None and VOCABULARY.search(name) is not None


def read_config(path) -> dict:
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p.parent / "config.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def config_layer_key(cfg: dict) -> str | None:
    for k in LAYER_KEYS:
        if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool):
            return k
    return None


def num_layers(names, cfg: dict | None = None) -> int:
    key = config_layer_key(cfg or {})
    if key is not None:
        return int(cfg[key])
    idx = [i for n in names if (i := layer_of(n)) is not None]
    return max(idx) + 1 if idx else 0
