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
