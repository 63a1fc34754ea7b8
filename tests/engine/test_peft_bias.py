"""PEFT LoRA adapters merge as peft's merge_and_unload does, biases included (bias="lora_only"/"all",
lora_bias=True); adapter keys name exactly one base tensor; target_modules is honoured."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import TINY_LLAMA
from weightops.engine import merge
from weightops.errors import CheckpointError
from weightops.io.checkpoint import Checkpoint

HF_KEYS = ("model_type", "architectures", "torch_dtype")


def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k not in HF_KEYS}, **kw))


@pytest.fixture(scope="module")
def llama_with_biases(tmp_path_factory):
    """A tiny Llama (fp32) whose attention and MLP projections have biases, as Qwen2-style models do."""
    root = tmp_path_factory.mktemp("peftbias")
    torch.manual_seed(0)
    model = _llama(attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
    model.save_pretrained(root / "base")
    return root, root / "base"


def _adapter(root, base, name, **lora_kw):
    """A peft adapter trained (here: perturbed) with the given bias options, and peft's merged model."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **lora_kw)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and n.endswith("bias"):  # what training with bias="lora_only"/"all" changes
                p.add_(torch.randn_like(p) * 0.05)
    out = root / name
    pm.save_pretrained(out)
    return out, {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("bias,lora_bias", [("lora_only", False), ("all", False), ("none", True), ("all", True)])
def test_biases_merge_as_peft_merge_and_unload(llama_with_biases, tmp_path, bias, lora_bias):
    root, base = llama_with_biases
    adapter, want = _adapter(tmp_path, base, f"a-{bias}-{lora_bias}", bias=bias, lora_bias=lora_bias)
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(k.endswith(".base_layer.bias") for k in keys) == (bias != "none")
    assert any(k.endswith("lora_B.bias") for k in keys) == lora_bias
    res = merge([adapter], base=base, method="task_arithmetic", out=tmp_path / "m", block_size=37, quiet=True)
    got = Checkpoint(res.out).load()
    base_sd = Checkpoint(base).load()
    changed = 0
    for k, v in want.items():
        if k == "lm_head.weight" and k not in got:
            continue
        torch.testing.assert_close(got[k].reshape(v.shape), v, rtol=1e-5, atol=1e-6, msg=k)
        changed += k.endswith("bias") and not torch.equal(base_sd[k], v)
    # the biases really moved: adapted ones always, the others' too with bias="all"
    assert changed == 9 + (12 if bias == "all" else 0), changed


def _edit_adapter(src, dst, *, config=None, rename=None):
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    sd = load_file(str(src / "adapter_model.safetensors"))
    if rename:
        sd = {rename(k): v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if k is not None}
    save_file(sd, str(dst / "adapter_model.safetensors"))
    return dst


def test_ambiguous_key_and_target_modules(llama_with_biases, tmp_path):
    root, base = llama_with_biases
    adapter, _ = _adapter(tmp_path, base, "a")
    layer0 = "base_model.model.model.layers.0."

    def strip_layer(k):  # keep layer 0's q_proj factors under a key without any layer prefix
        if k.startswith(layer0 + "self_attn.q_proj."):
            return "base_model.model.q_proj." + k[len(layer0 + "self_attn.q_proj."):]
        return None
    bad = _edit_adapter(adapter, tmp_path / "noprefix", rename=strip_layer)
    with pytest.raises(CheckpointError, match=r"'base_model.model.q_proj.lora_A.weight' matches 3 tensors"):
        merge([bad], base=base, method="task_arithmetic", out=tmp_path / "o", quiet=True)
    cases = {"targets": ({"target_modules": ["q_proj", "down_proj"]}, "model.layers.0.self_attn.v_proj"),
             "layers": ({"layers_to_transform": [0, 2]}, "model.layers.1."),
             "regex": ({"target_modules": r".*\.(q_proj|down_proj)"}, "v_proj"),
             "excluded": ({"exclude_modules": ["v_proj"]}, "v_proj")}
    for name, (cfg, needle) in cases.items():
        bad = _edit_adapter(adapter, tmp_path / name, config=cfg)
        with pytest.raises(CheckpointError, match="target_modules") as e:
            merge([bad], base=base, method="task_arithmetic", out=tmp_path / "o", quiet=True)
        assert needle in str(e.value), (name, str(e.value))
    ok = _edit_adapter(adapter, tmp_path / "regex-ok", config={"target_modules": r".*\.(q_proj|v_proj|down_proj)"})
    merge([ok], base=base, method="task_arithmetic", out=tmp_path / "o", quiet=True)
    assert not (tmp_path / ".o.weightops-tmp").exists() and (tmp_path / "o").is_dir()
