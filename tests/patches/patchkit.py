"""Helpers and fixtures for the patch tests: tiny versions v1 → v2 of a BERT, a PEFT LoRA adapter and a full fine-tune on v1 (made on the fly)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoints import TINY_BERT, make_bert_state, write_model  # noqa: E402

LORA_TARGETS = ["query", "value", "intermediate.dense", "word_embeddings"]


def bert_config():
    from transformers import BertConfig

    return BertConfig(**{k: v for k, v in TINY_BERT.items() if k not in ("model_type", "architectures")})


def make_adapter(base_sd: dict, out: Path, seed: int = 5, rslora: bool = False) -> Path:
    """A PEFT LoRA adapter on `base_sd` with non-zero A and B, a rank/alpha pattern and a modules_to_save."""
    import peft
    from transformers import BertModel

    torch.manual_seed(seed)
    model = BertModel(bert_config())
    model.load_state_dict(base_sd)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, modules_to_save=["pooler"],
                          rank_pattern={"value": 2}, alpha_pattern={"value": 3}, use_rslora=rslora)
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(out)
    return out


def peft_merged(base_sd: dict, adapter: Path) -> dict:
    """What PEFT itself makes of base + adapter: merge_and_unload's state dict."""
    import peft
    from transformers import BertModel

    model = BertModel(bert_config())
    model.load_state_dict(base_sd)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="session")
def versions(tmp_path_factory):
    """v1 (fp32), an evolved v2 (every weight moved), a LoRA adapter and a full fine-tune on v1."""
    root = tmp_path_factory.mktemp("versions")
    v1 = make_bert_state(0)
    v2 = make_bert_state(11, base=v1, scale=0.05)
    ft = make_bert_state(12, base=v1, scale=0.02)
    out = {"root": root, "v1_sd": v1, "v2_sd": v2, "ft_sd": ft,
           "v1": write_model(root / "v1", v1), "v2": write_model(root / "v2", v2, shards=2), "ft": write_model(root / "ft", ft)}
    out["adapter"] = make_adapter(v1, root / "adapter")
    return out


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `weightops ARGS` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from weightops.cli import main

    old, sys.argv = sys.argv, ["weightops", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(code: int, err: str) -> str:
    """The CLI's contract for bad input: exit 2 and exactly one `error: ...` line on stderr."""
    assert code == 2, err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
