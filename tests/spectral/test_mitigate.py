"""Mitigation: each intruder's σ times λ, the rest of W unchanged; written through the streaming engine."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from weightops.errors import WeightopsError
from weightops.io.adapter import LoraAdapter
from weightops.io.checkpoint import Checkpoint
from weightops.spectral import Options, write_adapter, write_model
from weightops.spectral import reference as ref

from _spectral import save_ckpt, spectral_matrix, spread_direction


@pytest.fixture()
def planted(tmp_path):
    """Base with two analysed matrices; the target plants one intruder (rank 1) in the query only."""
    g = torch.Generator().manual_seed(21)
    W0, U0, s0, V0 = spectral_matrix(96, 96, g)
    K0 = spectral_matrix(96, 72, g)[0]
    base = {"layer.0.attn.q_proj.weight": W0, "layer.0.mlp.down_proj.weight": K0, "layer.0.norm.weight": torch.ones(96)}
    u = spread_direction(U0, 20, g)
    v = torch.randn(96, generator=g)
    tgt = dict(base)
    tgt["layer.0.attn.q_proj.weight"] = W0 + 2.5 * torch.outer(u, v / v.norm())
    tgt["layer.0.mlp.down_proj.weight"] = K0 + 1e-4 * torch.randn(96, 72, generator=g)
    return tmp_path, save_ckpt(tmp_path / "base", base), save_ckpt(tmp_path / "tgt", tgt), base, tgt


@pytest.mark.parametrize("block_size", [None, 1000, 7])
def test_scales_the_intruder_sigma_and_nothing_else(planted, block_size):
    root, b, t, base, tgt = planted
    lam = 0.75
    rep, res = write_model(str(b), str(t), str(root / "out"), lam=lam, opts=Options(solver="fast", cache_dir=None),
                           block_size=block_size, quiet=True)
    out = load_file(str(root / "out" / "model.safetensors"))
    name = "layer.0.attn.q_proj.weight"
    W, W2 = tgt[name], out[name]
    S, S2 = torch.linalg.svdvals(W), torch.linalg.svdvals(W2)
    assert rep["targets"][0]["total"] == 1
    assert float(S2.max()) == pytest.approx(max(lam * float(S[0]), float(S[1])), rel=1e-5)
    rest = sorted(S2.tolist(), reverse=True)
    hit = min(rest, key=lambda x: abs(x - lam * float(S[0])))
    assert hit == pytest.approx(lam * float(S[0]), rel=1e-5)  # σ1 became λσ1 …
    rest.remove(hit)
    assert rest == pytest.approx(S[1:].tolist(), rel=1e-5, abs=1e-6)  # … and every other σ is unchanged
    want = ref.mitigate(base[name], W, lam)
    assert (W2 - want).abs().max() < 1e-6 * W.abs().max() * 10  # the rest of W to fp32 rounding
    # untouched tensors: the target's bytes
    assert torch.equal(out["layer.0.mlp.down_proj.weight"], tgt["layer.0.mlp.down_proj.weight"])
    assert torch.equal(out["layer.0.norm.weight"], tgt["layer.0.norm.weight"])
    man = json.loads((root / "out" / "weightops.json").read_text())
    assert man["method"] == "scale_intruders" and man["intruders"]["scaled"] == {name: [1]}


def test_lambda_one_is_identity_and_zero_removes(planted):
    root, b, t, base, tgt = planted
    name = "layer.0.attn.q_proj.weight"
    write_model(str(b), str(t), str(root / "o1"), lam=1.0, opts=Options(cache_dir=None), quiet=True)
    assert torch.allclose(load_file(str(root / "o1" / "model.safetensors"))[name], tgt[name], atol=1e-6)
    write_model(str(b), str(t), str(root / "o0"), lam=0.0, opts=Options(cache_dir=None), quiet=True)
    W2 = load_file(str(root / "o0" / "model.safetensors"))[name]
    assert torch.allclose(W2, ref.mitigate(base[name], tgt[name], 0.0), atol=1e-5)
    assert ref.count_intruders(base[name], W2) == 0


def test_adapter_target_merged_and_written_back(tmp_path, family):
    lam = 0.5
    rep, _ = write_model(str(family["base"]), str(family["lora"]), str(tmp_path / "m"), lam=lam,
                         opts=Options(cache_dir=None), quiet=True)
    out = load_file(str(tmp_path / "m" / "model.safetensors"))
    r, alpha = family["r"], family["alpha"]
    for name, (B, A) in family["factors"].items():
        W = ref.lora_weight(family["base_sd"][name], B, A, alpha, r)
        assert torch.allclose(out[name], ref.mitigate(family["base_sd"][name], W, lam), atol=2e-5), name
    for name, v in family["base_sd"].items():
        if name not in family["factors"]:
            assert torch.equal(out[name], v), name
    _, losses = write_adapter(str(family["base"]), str(family["lora"]), str(tmp_path / "a"), lam=lam,
                              opts=Options(cache_dir=None), quiet=True)
    assert set(losses) == {m["name"] for m in rep["targets"][0]["matrices"] if m["count"]}
    ad = LoraAdapter(tmp_path / "a", Checkpoint(family["base"]))
    for name in losses:
        f = ad.factors[name]
        assert f.rank == r
        shape = family["base_sd"][name].shape
        dW = ad.delta(name, 0, shape[0] * shape[1]).reshape(shape)
        B, A = family["factors"][name]
        exact = ref.mitigate(family["base_sd"][name], ref.lora_weight(family["base_sd"][name], B, A, alpha, r), lam) - family["base_sd"][name]
        # best rank-r approximation of the mitigated ΔW: error equals the reported loss
        rel = float((dW - exact).norm() / exact.norm())
        assert rel == pytest.approx(losses[name], rel=1e-3, abs=1e-6)
        assert 0 < losses[name] < 1


def test_bad_mitigation_input(planted, tmp_path):
    root, b, t, base, tgt = planted
    with pytest.raises(WeightopsError, match="scale"):
        write_model(str(b), str(t), str(root / "x"), lam=float("nan"), quiet=True)
    with pytest.raises(WeightopsError, match="LoRA adapter"):
        write_adapter(str(b), str(t), str(root / "y"), quiet=True)
    (root / "z").mkdir()
    with pytest.raises(WeightopsError, match="exists"):
        write_model(str(b), str(t), str(root / "z"), opts=Options(cache_dir=None), quiet=True)
    assert not (root / "x").exists() and not (root / "y").exists()
    assert [p.name for p in root.iterdir() if "weightops-tmp" in p.name] == []


def test_fan_in_fan_out_adapter_write_back(tmp_path):
    """GPT-2 style (Conv1D weights stored [in, out], ΔW = (B·A)ᵀ): analysis and write-back keep the layout."""
    import json as _json
    import math

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    W0 = spectral_matrix(70, 90, g)[0]  # stored [in=70, out=90]
    save_ckpt(tmp_path / "base", {"h.0.attn.c_attn.weight": W0})
    A, B = torch.randn(3, 70, generator=g) / math.sqrt(70), 2.0 * torch.randn(90, 3, generator=g)
    ad = tmp_path / "ad"
    ad.mkdir()
    save_file({"base_model.model.h.0.attn.c_attn.lora_A.weight": A, "base_model.model.h.0.attn.c_attn.lora_B.weight": B},
              str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(_json.dumps({"peft_type": "LORA", "r": 3, "lora_alpha": 6, "fan_in_fan_out": True}))
    W = W0 + 2.0 * (B @ A).T
    rep, losses = write_adapter(str(tmp_path / "base"), str(ad), str(tmp_path / "out"), lam=0.5,
                                opts=Options(solver="fast", cache_dir=None), quiet=True)
    m = rep["targets"][0]["matrices"][0]
    assert m["best_cos"] == pytest.approx(ref.best_cosines(W0, W).tolist(), abs=1e-4) and m["count"] > 0
    back = LoraAdapter(tmp_path / "out", Checkpoint(tmp_path / "base"))
    dW = back.delta("h.0.attn.c_attn.weight", 0, W0.numel()).reshape(W0.shape)
    exact = ref.mitigate(W0, W, 0.5) - W0
    assert float((dW - exact).norm() / exact.norm()) == pytest.approx(losses["h.0.attn.c_attn.weight"], rel=1e-3, abs=1e-6)
