"""Parity with peft 0.21: LoRA scaling (alpha/r, rsLoRA), `reduce_intruder_dimension` counts and write-back."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from weightops.io.adapter import LoraAdapter
from weightops.io.checkpoint import Checkpoint
from weightops.spectral import Options, analyse, write_adapter

peft = pytest.importorskip("peft")
from peft.tuners.lora.intruders import reduce_intruder_dimension  # noqa: E402

CFG = dict(vocab_size=32, hidden_size=96, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
           max_position_embeddings=16, type_vocab_size=1)


def _peft_model(tmp_path, rslora: bool, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(**CFG))
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(base / "model.safetensors"))
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, init_lora_weights=False,
                     target_modules=["query", "value", "intermediate.dense"])
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    for n, p in pm.named_parameters():
        if "lora_B" in n:  # a trained-looking B, large enough to create intruders
            p.data = 0.2 * torch.randn(p.shape, generator=g)
    pm.save_pretrained(str(tmp_path / "adapter"))
    return pm, base, tmp_path / "adapter"


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_counts_and_write_back_match_peft(tmp_path, rslora):
    pm, base, adapter = _peft_model(tmp_path, rslora)
    ours = LoraAdapter(adapter, Checkpoint(base))
    names = {}
    for mod_name, layer in pm.named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            name = mod_name[len("base_model.model."):] + ".weight"
            names[mod_name] = name
            shape = layer.get_base_layer().weight.shape
            # our ΔW = peft's get_delta_weight (scale alpha/r or alpha/√r)
            dW = ours.delta(name, 0, shape[0] * shape[1]).reshape(shape)
            assert torch.allclose(dW, layer.get_delta_weight("default"), atol=1e-6), name
            assert ours.factors[name].scale == pytest.approx(layer.scaling["default"])
    rep = analyse(str(base), [str(adapter)], opts=Options(solver="fast", cache_dir=None), quiet=True)
    counts = {m["name"]: m["count"] for m in rep["targets"][0]["matrices"]}
    logs = []
    reduce_intruder_dimension(pm, logging_sink=logs.append)
    theirs = {}
    for line in logs:
        m = re.match(r"^(\S+): (?:Intruders: (\d+)|No intruders)$", line)
        if m:
            theirs[names[m.group(1)]] = int(m.group(2) or 0)
    assert theirs == counts and sum(counts.values()) > 0
    # peft's rank-r write-back of the mitigated ΔW == ours
    write_adapter(str(base), str(adapter), str(tmp_path / "mitigated"), lam=0.75, opts=Options(cache_dir=None), quiet=True)
    mine = LoraAdapter(tmp_path / "mitigated", Checkpoint(base))
    for mod_name, name in names.items():
        layer = dict(pm.named_modules())[mod_name]
        shape = layer.get_base_layer().weight.shape
        want = layer.get_delta_weight("intruder_reduced").detach()
        got = mine.delta(name, 0, shape[0] * shape[1]).reshape(shape)
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()) + 1e-7), name
