"""Patches made from LoRA adapters and full fine-tunes, applied by streaming, against PEFT and whole-tensor references."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import write_model
from patchkit import make_adapter, peft_merged, versions  # noqa: F401  (fixture)
from weightops.errors import AlignmentError, WeightopsError
from weightops.io.checkpoint import Checkpoint
from weightops.patches import apply_patch, create_patch
from weightops.patches import reference as ref

FP32 = dict(rtol=1e-5, atol=1e-6)


def load(path) -> dict:
    return Checkpoint(path).load()


def assert_states_close(got: dict, want: dict, **tol):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def lora_patch(versions, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("lp") / "patch"
    create_patch(versions["v1"], out, adapter=versions["adapter"], quiet=True)
    return out


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_patch_on_v1_reproduces_peft_merge(versions, tmp_path, rslora):  # noqa: F811
    adapter = versions["adapter"] if not rslora else make_adapter(versions["v1_sd"], tmp_path / "ad", seed=6, rslora=True)
    create_patch(versions["v1"], tmp_path / "p", adapter=adapter, quiet=True)
    apply_patch(tmp_path / "p", versions["v1"], tmp_path / "out", quiet=True)
    assert_states_close(load(tmp_path / "out"), peft_merged(versions["v1_sd"], adapter), **FP32)


def test_lora_patch_keeps_factors_and_scales_exactly(versions, lora_patch):  # noqa: F811
    adapter = load_file(str(versions["adapter"] / "adapter_model.safetensors"))
    patch = load_file(str(lora_patch / "patch.safetensors"))
    meta = json.loads((lora_patch / "patch.json").read_text())
    q = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(patch[q + ".lora_A"], adapter["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"])
    assert torch.equal(patch[q + ".lora_B"], adapter["base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"])
    e = meta["entries"]
    assert (e[q]["rank"], e[q]["alpha"], e[q]["scale"], e[q]["scaling"]) == (4, 8.0, 2.0, "alpha/r")
    v = e["encoder.layer.1.attention.self.value.weight"]  # rank_pattern / alpha_pattern
    assert (v["rank"], v["alpha"], v["scale"]) == (2, 3.0, 1.5)
    assert e["embeddings.word_embeddings.weight"]["layout"] == "embedding"
    assert e["pooler.dense.weight"]["kind"] == "value"  # modules_to_save
    fp = meta["base_fingerprint"]["tensors"]
    assert len(fp) == len(versions["v1_sd"]) and all(len(x["sha256"]) == 64 for x in fp.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [7, 1000, None])
def test_apply_to_v2_matches_reference(versions, lora_patch, tmp_path, dtype, block_size):  # noqa: F811
    v2 = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in versions["v2_sd"].items()}
    write_model(tmp_path / "v2", v2)
    scale = 1.0 if block_size is None else 0.5
    apply_patch(lora_patch, tmp_path / "v2", tmp_path / "out", scale=scale, block_size=block_size,
                allow_dtype_mix=dtype != torch.float32, quiet=True)
    tol = FP32 if dtype == torch.float32 else {}
    assert_states_close(load(tmp_path / "out"), ref.apply(v2, lora_patch, scale=scale), **tol)


def test_dtype_change_needs_allow_dtype_mix(versions, lora_patch, tmp_path):  # noqa: F811
    write_model(tmp_path / "v2", {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in versions["v2_sd"].items()})
    with pytest.raises(AlignmentError, match=r"dtype mismatch: .* bfloat16 .* float32 .*--allow-dtype-mix"):
        apply_patch(lora_patch, tmp_path / "v2", tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_svd_patch_at_full_rank_is_exact(versions, tmp_path):  # noqa: F811
    r = create_patch(versions["v1"], tmp_path / "p", finetuned=versions["ft"], rank=10_000, quiet=True)
    low = [e for e in r["entries"] if e["kind"] == "lowrank"]
    assert low and all(e["rank"] == min(e["shape"]) and e["rel_error"] == 0.0 and e["energy"] == pytest.approx(1.0) for e in low)
    apply_patch(tmp_path / "p", versions["v1"], tmp_path / "out", quiet=True)
    assert_states_close(load(tmp_path / "out"), versions["ft_sd"], **FP32)


def test_svd_patch_truncated_is_the_best_rank_r_approximation(versions, tmp_path):  # noqa: F811
    v1, ft = versions["v1_sd"], versions["ft_sd"]
    r = create_patch(versions["v1"], tmp_path / "p", finetuned=versions["ft"], rank=3, quiet=True)
    apply_patch(tmp_path / "p", versions["v1"], tmp_path / "out", quiet=True)
    got = load(tmp_path / "out")
    for e in r["entries"]:
        name, delta = e["name"], ft[e["name"]].double() - v1[e["name"]].double()
        if e["kind"] == "dense":
            torch.testing.assert_close(got[name], ft[name], **FP32)
            continue
        assert e["rank"] == min(3, *e["shape"])
        approx = ref.svd_truncate(delta, 3)
        torch.testing.assert_close(got[name], (v1[name].double() + approx).float(), **FP32)
        assert e["rel_error"] == pytest.approx(float((delta - approx).norm() / delta.norm()), rel=1e-4, abs=1e-6)


def test_energy_picks_the_smallest_rank(versions, tmp_path):  # noqa: F811
    v1, ft = versions["v1_sd"], versions["ft_sd"]
    r = create_patch(versions["v1"], tmp_path / "p", finetuned=versions["ft"], energy=0.6, quiet=True)
    for e in r["entries"]:
        if e["kind"] != "lowrank":
            continue
        s2 = torch.linalg.svdvals((ft[e["name"]].double() - v1[e["name"]].double())).square()
        cum = (s2.cumsum(0) / s2.sum()).tolist()
        k = e["rank"]
        assert cum[k - 1] >= 0.6 - 1e-9 and (k == 1 or cum[k - 2] < 0.6), (e["name"], k, cum[:k])
        assert e["energy"] == pytest.approx(cum[k - 1], rel=1e-6)
        assert e["rel_error"] == pytest.approx(math.sqrt(max(0.0, 1 - cum[k - 1])), abs=1e-6)


def _odd_state(seed: int, base: dict | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w.empty": (0, 4), "w.one": (1,), "w.scalar_mat": (1, 1), "w.cube": (3, 5, 2), "w.odd": (7, 3),
              "w.wide": (2, 9), "w.same": (4, 4), "idx": None}
    out = {}
    for k, s in shapes.items():
        if s is None:
            out[k] = torch.arange(5)
        elif base is None or k == "w.same":
            out[k] = torch.randn(s, generator=g) if base is None else base[k].clone()
        else:
            out[k] = base[k] + torch.randn(s, generator=g)
    return out


@pytest.mark.parametrize("non_matrix", ["dense", "skip"])
def test_odd_shapes_and_blocks_that_do_not_divide(tmp_path, non_matrix):
    v1 = _odd_state(1)
    ft = _odd_state(2, base=v1)
    write_model(tmp_path / "v1", v1)
    write_model(tmp_path / "ft", ft)
    r = create_patch(tmp_path / "v1", tmp_path / "p", finetuned=tmp_path / "ft", rank=50, non_matrix=non_matrix,
                     dense="w.wide", quiet=True)
    kinds = {e["name"]: e["kind"] for e in r["entries"]}
    reasons = {s["name"]: s["reason"] for s in r["skipped"]}
    assert reasons["w.empty"] == "unchanged" and reasons["w.same"] == "unchanged" and reasons["idx"] == "non-float"
    assert kinds["w.odd"] == kinds["w.scalar_mat"] == "lowrank" and kinds["w.wide"] == "dense"
    if non_matrix == "dense":
        assert kinds["w.one"] == kinds["w.cube"] == "dense"
    else:
        assert reasons["w.one"] == reasons["w.cube"] == "non-matrix"
    for bs in (1, 4, 5):
        out = tmp_path / f"out{bs}"
        apply_patch(tmp_path / "p", tmp_path / "v1", out, block_size=bs, quiet=True)
        want = ft if non_matrix == "dense" else {**ft, "w.one": v1["w.one"], "w.cube": v1["w.cube"]}
        assert_states_close(load(out), want, **FP32)


def test_create_refuses_bad_arguments(versions, tmp_path):  # noqa: F811
    v1, ft, ad = versions["v1"], versions["ft"], versions["adapter"]
    cases = [
        (dict(), "exactly one of --adapter"),
        (dict(adapter=ad, finetuned=ft), "exactly one of --adapter"),
        (dict(finetuned=ft), "exactly one of --rank"),
        (dict(finetuned=ft, rank=2, energy=0.5), "exactly one of --rank"),
        (dict(finetuned=ft, energy=1.5), r"--energy must be in \(0, 1\]"),
        (dict(finetuned=ft, rank=0), "--rank must be at least 1"),
        (dict(adapter=ad, rank=4), "apply to --finetuned only"),
        (dict(finetuned=ad, rank=4), "is a LoRA adapter"),
        (dict(finetuned=v1, rank=4), "nothing to patch"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(WeightopsError, match=msg):
            create_patch(v1, tmp_path / "p", quiet=True, **kwargs)
        assert not (tmp_path / "p").exists()


def test_as_adapter_loads_in_peft_on_v2(versions, lora_patch, tmp_path):  # noqa: F811
    apply_patch(lora_patch, versions["v2"], tmp_path / "ad", as_adapter=True, scale=0.5, quiet=True)
    apply_patch(lora_patch, versions["v2"], tmp_path / "model", scale=0.5, quiet=True)
    assert_states_close(peft_merged(versions["v2_sd"], tmp_path / "ad"), load(tmp_path / "model"), **FP32)


def test_svd_patch_as_adapter_including_embeddings(versions, tmp_path):  # noqa: F811
    create_patch(versions["v1"], tmp_path / "p", finetuned=versions["ft"], rank=5, non_matrix="skip", quiet=True)
    apply_patch(tmp_path / "p", versions["v2"], tmp_path / "ad", as_adapter=True, quiet=True)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert "embeddings.word_embeddings" in cfg["target_modules"]
    apply_patch(tmp_path / "p", versions["v2"], tmp_path / "model", quiet=True)
    assert_states_close(peft_merged(versions["v2_sd"], tmp_path / "ad"), load(tmp_path / "model"), rtol=1e-5, atol=1e-5)


def test_as_adapter_refuses_dense_patches(versions, tmp_path):  # noqa: F811
    create_patch(versions["v1"], tmp_path / "p", finetuned=versions["ft"], rank=2, quiet=True)
    with pytest.raises(WeightopsError, match="needs a low-rank patch.*--non-matrix skip"):
        apply_patch(tmp_path / "p", versions["v2"], tmp_path / "ad", as_adapter=True, quiet=True)
    assert not (tmp_path / "ad").exists()


def test_apply_manifest_names_the_patch(versions, lora_patch, tmp_path):  # noqa: F811
    res = apply_patch(lora_patch, versions["v2"], tmp_path / "out", quiet=True)
    m = json.loads((tmp_path / "out" / "weightops.json").read_text())
    meta = json.loads((lora_patch / "patch.json").read_text())
    assert m["method"] == "patch" and m["patch"]["meta_sha256"] == meta["meta_sha256"]
    assert m["patch"]["base_fingerprint"] == meta["base_fingerprint"]["sha256"]
    assert (tmp_path / "out" / "config.json").is_file() and res.manifest["outputs"]["tensors"]


def test_tensors_on_one_side_only_are_left_out_and_listed(tmp_path):
    v1 = _odd_state(1)
    ft = _odd_state(2, base=v1)
    ft.pop("w.odd")
    ft["w.new"] = torch.ones(3)
    write_model(tmp_path / "v1", v1)
    write_model(tmp_path / "ft", ft)
    r = create_patch(tmp_path / "v1", tmp_path / "p", finetuned=tmp_path / "ft", rank=2, quiet=True)
    reasons = {s["name"]: s["reason"] for s in r["skipped"]}
    assert reasons["w.odd"] == "missing in a model" and reasons["w.new"] == "not in the base"
    assert {e["name"] for e in r["entries"]} == {"w.one", "w.scalar_mat", "w.cube", "w.wide"}
    ft["w.wide"] = ft["w.wide"][:1].clone()
    write_model(tmp_path / "ft2", ft)
    with pytest.raises(AlignmentError, match="shape mismatch: 'w.wide'"):
        create_patch(tmp_path / "v1", tmp_path / "p2", finetuned=tmp_path / "ft2", rank=2, quiet=True)
    assert not (tmp_path / "p2").exists()
