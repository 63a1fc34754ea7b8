"""DPP test data: odd-shaped checkpoints in several dtypes, and a tiny BERT with a tokenizer (import the fixtures)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import make_bert_state, write_model  # the root tests/conftest.py

WORDS = ["the", "a", "movie", "film", "was", "is", "good", "bad", "great", "awful", "plot", "actor", "i", "liked",
         "hated", "it", "very", "not", "and", "but", "story", "music", "boring", "fun", "really", "so"]


def odd_state(seed: int, dtype, base=None, scale=0.05) -> dict:
    """Shapes that do not divide block sizes, a 3-D tensor, 1-element and empty tensors, an int buffer."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"w.a": (37, 29), "w.b": (5, 3, 7), "w.one": (1,), "w.scalar": (), "w.empty": (0, 4), "w.row": (1, 61),
              "w.vec": (53,)}
    if base is None:
        sd = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
        sd["ids"] = torch.arange(7)
        return sd
    return {k: ((v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v.clone())
            for k, v in base.items()}


def save_dir(path: Path, sd: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def odd_pairs(tmp_path_factory):
    """{dtype name: (base dir, ft dir, base sd, ft sd)} for fp32, bf16, fp16."""
    root = tmp_path_factory.mktemp("dpp_odd")
    out = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        b = odd_state(1, dt)
        f = odd_state(2, dt, base=b)
        out[name] = (save_dir(root / f"base_{name}", b), save_dir(root / f"ft_{name}", f), b, f)
    return out


def add_tokenizer(path: Path) -> None:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    vocab += [f"w{i}" for i in range(64 - len(vocab))]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                                                            "model_max_length": 32}))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A tiny BertModel base and a fine-tune of it (with tokenizer files), and unlabelled texts."""
    root = tmp_path_factory.mktemp("dpp_bert")
    base = make_bert_state(0)
    ft = make_bert_state(7, base=base, scale=0.02)
    b, f = write_model(root / "base", base), write_model(root / "ft", ft)
    for d in (b, f):
        add_tokenizer(d)
    g = torch.Generator().manual_seed(3)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
             for n in torch.randint(3, 12, (24,), generator=g)]
    (root / "texts.txt").write_text("\n".join(texts) + "\n")
    return {"base": b, "ft": f, "texts": root / "texts.txt", "base_sd": base, "ft_sd": ft}
