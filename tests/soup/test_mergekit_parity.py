"""mergekit 0.1.5 itself (a test dependency) against weightops on generated Llama-shaped checkpoints: a
CI-sized subset of tests/mkcases.py (every case runs in benchmarks/mergekit_parity.py); frankenmerges
that load in transformers; hub ids from a local HF cache, offline; model+lora references; model cards."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import mkcases
from checkpoints import make_llama_state, write_model

pytest.importorskip("mergekit")

SUBSET = ["ties", "nuslerp_rows_base", "model_stock_filter_wise", "ramplus_tl", "sce_all", "della",
          "passthrough_frankenmerge", "partial_single_slice", "slices_per_slice_params"]


@pytest.fixture(scope="module")
def mk_models(tmp_path_factory):
    return mkcases.make_models(tmp_path_factory.mktemp("mkp"))


@pytest.mark.parametrize("name", SUBSET)
def test_same_tensors_as_mergekit(name, mk_models, tmp_path):
    from weightops.mergekit_compat import mergekit_merge

    cfg, expect = mkcases.cases(mk_models)[name]
    mkcases.run_mergekit(cfg, tmp_path / "mk")
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    mergekit_merge(tmp_path / "c.yml", tmp_path / "wo", quiet=True, block_size=1000)
    mk, wo = mkcases.load(tmp_path / "mk"), mkcases.load(tmp_path / "wo")
    r = mkcases.compare(mk, wo)
    assert r["same_names"], r
    assert mkcases.ok(expect, r), r
    if expect == "count":  # the counting/tie rule differs: only a few elements, counted
        assert r["elements_differing"] <= 0.08 * r["elements"], r
    if expect == "random":  # different random masks: the untouched tensors (norms whose bf16 deltas are 0) agree
        same = [k for k in mk if torch.equal(mk[k], wo[k])]
        assert any(k.endswith("layernorm.weight") for k in same), r
        # kept fraction of each model's delta ≈ density (0.6 ± 0.1 by rank): measured on the largest tensor
    if name == "partial_single_slice":  # the old wrong result merged all 6 layers: the output has layers 1..3 only
        assert json.loads((tmp_path / "wo" / "config.json").read_text())["num_hidden_layers"] == 3
        assert "model.layers.3.mlp.up_proj.weight" not in wo and "model.layers.2.mlp.up_proj.weight" in wo


def test_karcher_equals_mergekits_algorithm_in_float64(mk_models, tmp_path):
    """mergekit iterates on fp32 vectors (drifting ~1e-3 on near-identical bf16 norms); its own function run in
    float64 equals ours, tensor by tensor."""
    from mergekit.merge_methods.karcher import karcher_merge_tensors

    from weightops.io.checkpoint import Checkpoint
    from weightops.mergekit_compat import mergekit_merge

    cfg, _ = mkcases.cases(mk_models)["karcher"]
    res = mergekit_merge(cfg, tmp_path / "wo", quiet=True)
    got = Checkpoint(res.out).load()
    srcs = [Checkpoint(mk_models[k]) for k in ("ft0", "ft1", "ft2")]
    for name in list(got)[:12] + ["model.layers.2.post_attention_layernorm.weight"]:
        xs = [s.load([name])[name].double() for s in srcs]
        want = karcher_merge_tensors(xs, [1 / 3] * 3, max_iter=20, tol=1e-5)
        torch.testing.assert_close(got[name].double(), want, rtol=2e-6, atol=1e-9, msg=name)


def test_frankenmerge_forward_equals_hand_assembled(tmp_path):
    """layers 0-3 of A then 2-5 of B: loads in transformers, and its logits equal the model built by hand."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from weightops.mergekit_compat import mergekit_merge

    cfg6 = dict(mkcases.LLAMA6, torch_dtype="float32")
    A, B = (make_llama_state(s, cfg=cfg6, dtype=torch.float32) for s in (1, 2))
    pa, pb = write_model(tmp_path / "A", A, config=cfg6), write_model(tmp_path / "B", B, config=cfg6)
    conf = {"slices": [{"sources": [{"model": str(pa), "layer_range": [0, 4]}]},
                       {"sources": [{"model": str(pb), "layer_range": [2, 6]}]}], "merge_method": "passthrough"}
    out = mergekit_merge(conf, tmp_path / "fr", quiet=True).out
    merged = LlamaForCausalLM.from_pretrained(out).eval()
    assert merged.config.num_hidden_layers == 8
    hand_cfg = LlamaConfig(**{k: v for k, v in cfg6.items() if k not in ("model_type", "architectures")})
    hand_cfg.num_hidden_layers = 8
    hand = LlamaForCausalLM(hand_cfg).eval()
    sd = {"model.embed_tokens.weight": A["model.embed_tokens.weight"], "model.norm.weight": B["model.norm.weight"],
          "lm_head.weight": B["lm_head.weight"]}
    for out_i, (src, i) in enumerate([(A, 0), (A, 1), (A, 2), (A, 3), (B, 2), (B, 3), (B, 4), (B, 5)]):
        for k, v in src.items():
            if k.startswith(f"model.layers.{i}."):
                sd[k.replace(f"model.layers.{i}.", f"model.layers.{out_i}.", 1)] = v
    hand.load_state_dict(sd, strict=True)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, hand(ids).logits, rtol=0, atol=0)


def _hf_cache(root: Path, repo: str, src: Path, commit: str, ref: str = "main") -> None:
    """The huggingface_hub cache layout: models--org--name/{refs/<ref>, snapshots/<commit>/...}."""
    d = root / ("models--" + repo.replace("/", "--"))
    (d / "refs").mkdir(parents=True, exist_ok=True)
    (d / "refs" / ref).write_text(commit)
    snap = d / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())


def test_hub_ids_resolve_offline_in_every_command(mk_models, tmp_path):
    cache = tmp_path / "hf"
    _hf_cache(cache, "org/base", Path(mk_models["base"]), "a" * 40)
    _hf_cache(cache, "org/ft-a", Path(mk_models["ft0"]), "b" * 40)
    _hf_cache(cache, "org/ft-b", Path(mk_models["ft1"]), "c" * 40, ref="v1")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def wo(*args):
        return subprocess.run([sys.executable, "-m", "weightops", *args], env=env, capture_output=True, text=True)

    r = wo("merge", "org/ft-a", "org/ft-b@v1", "--base", "org/base", "--method", "task_arithmetic", "--out",
           str(tmp_path / "m"), "-q")
    assert r.returncode == 0, r.stderr
    man = json.loads((tmp_path / "m" / "weightops.json").read_text())
    hubs = [i.get("hub") for i in man["inputs"]]
    assert {"repo_id": "org/ft-b", "revision": "v1", "commit": "c" * 40} in hubs
    card = (tmp_path / "m" / "README.md").read_text()
    assert card.startswith("---\nbase_model:\n- org/base\n") and "- weightops" in card and "library_name: transformers" in card
    assert "weightops merge org/ft-a org/ft-b@v1" in card
    assert wo("inspect", "org/ft-a").returncode == 0
    cfg = {"models": [{"model": "org/ft-a", "parameters": {"weight": 1.0}}], "merge_method": "task_arithmetic",
           "base_model": "org/base"}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    r = wo("run", str(tmp_path / "c.yml"), str(tmp_path / "y"), "-q")
    assert r.returncode == 0, r.stderr
    r = wo("merge", "org/missing", "--base", "org/base", "--method", "task_arithmetic", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "org/missing is not in the Hugging Face cache" in r.stderr and "HF_HUB_OFFLINE=1" in r.stderr
    assert r.stderr.count("error:") == 1 and not (tmp_path / "x").exists()


def test_model_plus_lora_reference(mk_models, tmp_path):
    """`base+adapter` in a config is the base with the adapter's ΔW applied (our adapter reader)."""
    from safetensors.torch import save_file

    from weightops.io.checkpoint import Checkpoint
    from weightops.mergekit_compat import mergekit_merge

    ad = tmp_path / "lora"
    ad.mkdir()
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 40, generator=g) * 0.1, torch.randn(40, 4, generator=g) * 0.1
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": A,
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": B}, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                        "target_modules": ["q_proj"]}))
    base = mk_models["base"]
    cfg = {"models": [{"model": f"{base}+{ad}", "parameters": {"weight": 1.0}}], "merge_method": "linear",
           "dtype": "float32", "out_dtype": "float32"}
    got = Checkpoint(mergekit_merge(cfg, tmp_path / "o", quiet=True).out).load()
    w0 = Checkpoint(base).load(["model.layers.0.self_attn.q_proj.weight"])["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(got["model.layers.0.self_attn.q_proj.weight"], w0.float() + 2.0 * (B @ A), rtol=0, atol=1e-6)


def test_no_card_and_run_force(mk_models, tmp_path):
    from typer.testing import CliRunner

    from weightops.cli import app

    cfg, _ = mkcases.cases(mk_models)["passthrough_frankenmerge"]
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["run", str(tmp_path / "c.yml"), str(out), "--no-card"])
    assert r.exit_code == 0, r.output
    assert not (out / "README.md").exists() and "num_hidden_layers set to 8" in r.output
    r = CliRunner().invoke(app, ["run", str(tmp_path / "c.yml"), str(out)])
    assert r.exit_code != 0 and "--force" in str(r.output) + str(r.exception)
    r = CliRunner().invoke(app, ["run", str(tmp_path / "c.yml"), str(out), "--force"])
    assert r.exit_code == 0 and (out / "README.md").is_file()
    assert "passthrough" in (out / "README.md").read_text() and "layer_range" in (out / "README.md").read_text()
