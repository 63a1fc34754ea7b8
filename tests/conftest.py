"""Shared fixtures: tiny checkpoints generated on the fly (no network, no hub)."""
from __future__ import annotations

import pytest

from checkpoints import make_bert_state, write_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """base + three fine-tunes, fp32, single-file and sharded."""
    root = tmp_path_factory.mktemp("tiny")
    base = make_bert_state(0)
    out = {"base_sd": base, "base": write_model(root / "base", base)}
    for i in range(3):
        sd = make_bert_state(100 + i, base=base)
        out[f"ft{i}_sd"] = sd
        out[f"ft{i}"] = write_model(root / f"ft{i}", sd, shards=2 if i == 1 else 1)
    return out


@pytest.fixture(scope="session")
def llama_models(tmp_path_factory):
    """A bf16 Llama-shaped base + three fine-tunes with realistic deltas (few distinct |delta|, many ties);
    ft1 is sharded. Keys as in tiny_models; `config` is the config.json written."""
    from checkpoints import TINY_LLAMA, make_llama_state

    root = tmp_path_factory.mktemp("llama")
    base = make_llama_state(0)
    out = {"base_sd": base, "base": write_model(root / "base", base, config=TINY_LLAMA), "config": TINY_LLAMA}
    for i in range(3):
        sd = make_llama_state(100 + i, base=base, delta=(3e-4, 1e-4, 1e-3)[i])
        out[f"ft{i}_sd"] = sd
        out[f"ft{i}"] = write_model(root / f"ft{i}", sd, shards=2 if i == 1 else 1, config=TINY_LLAMA)
    return out
