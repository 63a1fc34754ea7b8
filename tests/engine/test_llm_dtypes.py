"""Every dtype a user's checkpoint holds is merged or refused by name: block-scaled FP8 (DeepSeek-V3 /
Qwen3-FP8 layout) merged in fp32 and written as bf16 or re-quantized, unknown FP8 refused, integer/bool
buffers copied with a warning; config.json states the dtype that was written."""
from __future__ import annotations

import json
import math

import pytest
import torch

from checkpoints import TINY_BERT, TINY_LLAMA, make_bert_state, make_llama_state, write_model
from clirun import one_line_error, run_cli
from weightops.engine import merge
from weightops.errors import WeightopsError
from weightops.info import verify
from weightops.io.checkpoint import Checkpoint
from weightops.methods import reference as R

FP8 = torch.float8_e4m3fn
QCFG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
# Llama-shaped, with linear weights larger than one 128×128 block and sizes that 128 does not divide
# (partial blocks at the right and bottom edges).
FP8_LLAMA = dict(TINY_LLAMA, hidden_size=160, intermediate_size=300, head_dim=40, num_hidden_layers=2,
                 quantization_config=QCFG)


# -- a plain FP8 codec written from the convention (not weightops') -------------------------------
def expand(scale: torch.Tensor, shape) -> torch.Tensor:
    return scale.float().repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's weight quantization: scale_inv = amax/448 per 128×128 block, fp8 = w / scale_inv."""
    rows, cols = w.shape
    nb, nc = math.ceil(rows / 128), math.ceil(cols / 128)
    s = torch.ones(nb, nc)
    for i in range(nb):
        for j in range(nc):
            a = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float().abs().max()
            if a > 0:
                s[i, j] = a / 448
    return (w.float() / expand(s, w.shape)).clamp(-448, 448).to(FP8), s


def dequantize(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith("_scale_inv"):
            continue
        out[k] = v.float() * expand(sd[k + "_scale_inv"], v.shape) if v.dtype == FP8 else v.float()
    return out


def to_fp8(sd: dict) -> dict:
    """The linear weights of the decoder layers in FP8 with block scales; embeddings, norms, head in bf16."""
    out = {}
    for k, v in sd.items():
        if v.ndim == 2 and ".layers." in k:
            out[k], out[k + "_scale_inv"] = quantize(v)
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    base = to_fp8(make_llama_state(0, cfg=FP8_LLAMA))
    out = {"root": root, "base_sd": base, "base": write_model(root / "base", base, config=FP8_LLAMA)}
    for i in range(2):
        sd = to_fp8(make_llama_state(10 + i, base=make_llama_state(0, cfg=FP8_LLAMA), delta=2e-3, cfg=FP8_LLAMA))
        out[f"ft{i}_sd"] = sd
        out[f"ft{i}"] = write_model(root / f"ft{i}", sd, shards=2 if i else 1, config=FP8_LLAMA)
    return out


def _reference(m, method, **kw):
    deq = [dequantize(m[k]) for k in ("base_sd", "ft0_sd", "ft1_sd")]
    if method == "linear":
        return R.linear(deq[1:], weights=kw.get("weights"))
    return R.task_vector_merge(deq[0], deq[1:], consensus="sum", weights=kw.get("weights"))


@pytest.mark.parametrize("method,kw", [("task_arithmetic", {"weights": [0.7, 0.5]}), ("linear", {})])
def test_fp8_merges_in_fp32_and_writes_bf16(fp8_models, tmp_path, method, kw):
    m = fp8_models
    want = _reference(m, method, **kw)
    outs = []
    for bs in (None, 1000):  # 1000 elements: blocks that cut rows and 128×128 scale blocks anywhere
        res = merge([m["ft0"], m["ft1"]], base=m["base"], method=method, out=tmp_path / f"o{bs}", block_size=bs,
                    quiet=True, **kw)
        got = Checkpoint(res.out).load()
        assert not any(k.endswith("_scale_inv") for k in got)
        assert set(got) == set(want)
        for k, v in got.items():
            assert v.dtype == torch.bfloat16, k  # FP8 weights and the bf16 rest alike
            torch.testing.assert_close(v.float(), want[k].to(torch.bfloat16).float(), rtol=2 ** -8, atol=1e-7, msg=k)
        cfg = json.loads((res.out / "config.json").read_text())
        assert "quantization_config" not in cfg and cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
        assert verify(res.out)["ok"]
        outs.append((res.out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


def test_fp8_requantized_within_one_fp8_step(fp8_models, tmp_path):
    m = fp8_models
    want = _reference(m, "task_arithmetic", weights=[0.7, 0.5])
    outs = []
    for bs in (None, 1000):
        res = merge([m["ft0"], m["ft1"]], base=m["base"], method="task_arithmetic", weights=[0.7, 0.5],
                    dtype="float8_e4m3fn", out=tmp_path / f"o{bs}", block_size=bs, quiet=True)
        ck = Checkpoint(res.out)
        raw = {n: ck.raw_infos[n].file.read(ck.raw_infos[n], 0, ck.raw_infos[n].numel).clone().reshape(ck.raw_infos[n].shape)
               for n in ck.raw_infos}
        assert set(raw) == set(m["base_sd"])  # the same layout as the input: FP8 weights, their scales, bf16 rest
        for k, v in raw.items():
            assert v.dtype == m["base_sd"][k].dtype, k
            if v.dtype != FP8:
                continue
            s = raw[k + "_scale_inv"]
            assert s.dtype == torch.float32 and tuple(s.shape) == (math.ceil(v.shape[0] / 128), math.ceil(v.shape[1] / 128))
            full = expand(s, v.shape)
            y, ref = v.float() * full, want[k]
            # one FP8 step at |ref| on the scaled grid (e4m3: 3 mantissa bits; subnormal floor 2^-9)
            step = torch.exp2(torch.floor(torch.log2((ref.abs() / full).clamp_min(2.0 ** -6))) - 3) * full
            assert bool(((y - ref).abs() <= step).all()), (k, float(((y - ref).abs() / step).max()))
            # fresh scales: amax of the merged block / 448
            torch.testing.assert_close(s, quantize(ref)[1], rtol=1e-6, atol=0)
        cfg = json.loads((res.out / "config.json").read_text())
        assert cfg["quantization_config"]["quant_method"] == "fp8" and cfg["torch_dtype"] == "bfloat16"
        assert verify(res.out)["ok"]
        outs.append((res.out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


def test_fp8_dequantized_as_transformers_does_and_outputs_load(tmp_path):
    """transformers (CPU: dequantizes FP8 checkpoints to bf16) reads our inputs and both kinds of output."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg = dict(FP8_LLAMA, hidden_size=256, intermediate_size=384, head_dim=64)  # transformers needs whole blocks
    sd = to_fp8(make_llama_state(3, cfg=cfg))
    base = write_model(tmp_path / "base", sd, config=cfg)
    hf = AutoModelForCausalLM.from_pretrained(base, dtype="auto").state_dict()
    ours = Checkpoint(base).load()
    for k, v in ours.items():
        assert torch.equal(hf[k], v.to(torch.bfloat16)), k
    for dtype, want in ((None, torch.bfloat16), ("float8_e4m3fn", torch.bfloat16), ("float32", torch.float32)):
        res = merge([base], base=base, method="linear", dtype=dtype, out=tmp_path / f"o-{dtype}", quiet=True)
        model = AutoModelForCausalLM.from_pretrained(res.out, dtype="auto")
        assert model.dtype == want, dtype
        got = model.state_dict()
        for k, v in ours.items():
            assert torch.equal(got[k], v.to(want)), (dtype, k)  # FP8 → FP8 keeps the values: fresh scales = old ones


def test_unknown_fp8_conventions_are_refused(tmp_path):
    sd = make_llama_state(0)
    w = "model.layers.0.mlp.up_proj.weight"
    cases = {
        "no scale": ({**sd, w: sd[w].float().to(FP8)}, TINY_LLAMA, [w, "without a block scale"]),
        "per-tensor": ({**sd, w: sd[w].float().to(FP8), w + "_scale": torch.ones(())}, TINY_LLAMA,
                       [w, "per-tensor/per-channel"]),
        "grid": ({**sd, w: sd[w].float().to(FP8), w + "_scale_inv": torch.ones(2, 2)}, TINY_LLAMA, [w, "[1, 1]"]),
        "e5m2": ({**sd, w: sd[w].float().to(torch.float8_e5m2)}, TINY_LLAMA, [w, "without a block scale"]),
        "stray scale": ({**sd, w + "_scale_inv": torch.ones(1, 1)}, TINY_LLAMA, [w + "_scale_inv", "bfloat16 tensor"]),
        "other method": (sd, dict(TINY_LLAMA, quantization_config={"quant_method": "gptq", "bits": 4}), ["'gptq'-quantized"]),
    }
    for case, (state, cfg, needles) in cases.items():
        bad = write_model(tmp_path / case.replace(" ", "_"), state, config=cfg)
        res = run_cli("merge", bad, bad, "--method", "linear", "--out", tmp_path / "out")
        one_line_error(res, *needles)
        assert not (tmp_path / "out").exists()
    with pytest.raises(WeightopsError, match="has none"):
        good = write_model(tmp_path / "good", sd, config=TINY_LLAMA)
        merge([good], method="linear", dtype="float8_e4m3fn", out=tmp_path / "out", quiet=True)


def test_every_dtype_is_merged_or_announced(tmp_path):
    """float64 is merged (not copied); integer and bool buffers are copied with a warning; complex is refused."""
    base = make_bert_state(0)
    extra = {"stats.f64": torch.randn(5, dtype=torch.float64), "buf.i64": torch.arange(4), "buf.mask": torch.tensor([True, False])}
    a = write_model(tmp_path / "a", {**base, **extra})
    b = write_model(tmp_path / "b", {**base, **extra, "stats.f64": extra["stats.f64"] + 1})
    res = merge([a, b], method="linear", out=tmp_path / "m", quiet=True)
    got = Checkpoint(res.out).load()
    assert got["stats.f64"].dtype == torch.float64
    torch.testing.assert_close(got["stats.f64"], extra["stats.f64"] + 0.5)
    assert torch.equal(got["buf.i64"], extra["buf.i64"]) and torch.equal(got["buf.mask"], extra["buf.mask"])
    notes = [w for w in res.warnings if "integer/bool" in w]
    assert len(notes) == 1 and "'buf.i64'" in notes[0] and "'buf.mask'" in notes[0], res.warnings
    assert any("float64 tensor(s) merged in float32" in w for w in res.warnings)
    man = json.loads((res.out / "weightops.json").read_text())["outputs"]["tensors"]
    assert man["buf.i64"]["reason"] == "non-float" and man["stats.f64"]["action"] == "merge"
    from safetensors.torch import save_file

    (tmp_path / "c").mkdir()
    save_file({"w": torch.zeros(2, dtype=torch.complex64)}, str(tmp_path / "c" / "model.safetensors"))
    one_line_error(run_cli("merge", tmp_path / "c", tmp_path / "c", "--out", tmp_path / "out"), "'w'", "C64")


# -- config.json states the dtype written ---------------------------------------------------------
@pytest.mark.parametrize("dtype,want", [("float32", torch.float32), ("float16", torch.float16), (None, torch.bfloat16)])
def test_from_pretrained_auto_loads_the_written_dtype(llama_models, tmp_path, dtype, want):
    from transformers import AutoModelForCausalLM

    res = merge([llama_models["ft0"], llama_models["ft1"]], base=llama_models["base"], method="task_arithmetic",
                dtype=dtype, out=tmp_path / "m", quiet=True)
    cfg = json.loads((res.out / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == str(want)[6:]
    assert AutoModelForCausalLM.from_pretrained(res.out, dtype="auto").dtype == want


def test_mergekit_dtype_is_written_to_config(tmp_path):
    from transformers import AutoModel

    from weightops.mergekit_compat import mergekit_merge

    base = make_bert_state(0)
    a, b = (write_model(tmp_path / n, make_bert_state(i, base=base)) for i, n in ((1, "a"), (2, "b")))
    assert TINY_BERT.get("torch_dtype") is None  # the input config says nothing (transformers then reads the weights)
    mergekit_merge({"models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 1.0}}], "merge_method": "linear", "dtype": "bfloat16"},
                   tmp_path / "m", quiet=True)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert AutoModel.from_pretrained(tmp_path / "m", dtype="auto").dtype == torch.bfloat16


def test_composite_config_sub_dtypes(tmp_path):
    """Sub-configs that carry their own dtype (text_config, ...) get the written dtype too."""
    base = make_bert_state(0)
    cfg = dict(TINY_BERT, torch_dtype="float32", text_config={"torch_dtype": "float32", "hidden_size": 24})
    a = write_model(tmp_path / "a", base, config=cfg)
    merge([a, a], method="linear", dtype="bfloat16", out=tmp_path / "m", quiet=True)
    out = json.loads((tmp_path / "m" / "config.json").read_text())
    assert out["torch_dtype"] == out["text_config"]["torch_dtype"] == "bfloat16" and "dtype" not in out["text_config"]
