"""mergekit YAML configs (in the shape of mergekit's docs/examples) run through weightops and give the
same tensors as `weightops merge` with the equivalent flags; the mergekit-only variants match references."""
from __future__ import annotations

import math
import re
import shlex

import pytest
import torch
import yaml
from typer.testing import CliRunner

from weightops.errors import WeightopsError
from weightops.io.checkpoint import Checkpoint
from weightops.mergekit_compat import MergekitError, evaluate_setting, mergekit_merge, translate
from weightops.ops import drop_threshold, model_key
from weightops.ops.reference import philox_keep_mask
from weightops.recipes import run_recipe


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """base + three fine-tunes with few tensors (exact per-tensor thresholds have a fixed cost per tensor):
    two 'layers', a feed-forward ('intermediate') tensor in each for filters, a head, an integer buffer."""
    from checkpoints import write_model

    root = tmp_path_factory.mktemp("mk")
    g = torch.Generator().manual_seed(0)
    shapes = {"embeddings.weight": (9, 7), "encoder.layer.0.attention.weight": (8, 8),
              "encoder.layer.0.intermediate.weight": (12, 8), "encoder.layer.1.attention.weight": (8, 8),
              "encoder.layer.1.intermediate.weight": (12, 8), "classifier.bias": (3,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["position_ids"] = torch.arange(5)
    out = {"base_sd": base, "base": write_model(root / "base", base)}
    for i in range(3):
        sd = {k: (v + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
              for k, v in base.items()}
        out[f"ft{i}_sd"] = sd
        out[f"ft{i}"] = write_model(root / f"ft{i}", sd)
    return out


def load(path) -> dict:
    c = Checkpoint(path)
    sd = c.load(list(c.infos))
    c.close()
    return sd


def configs(t) -> dict:
    """mergekit's documented examples (examples/linear.yml, README/docs snippets) on the tiny models."""
    b, a, c, d = (str(t[k]) for k in ("base", "ft0", "ft1", "ft2"))
    return {
        "linear": {"models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": c, "parameters": {"weight": 0.3}},
                              {"model": d, "parameters": {"weight": 0.5}}],
                   "merge_method": "linear", "dtype": "float16"},
        "task_arithmetic": {"models": [{"model": a, "parameters": {"weight": 0.7}},
                                       {"model": c, "parameters": {"weight": -0.3}}],
                            "merge_method": "task_arithmetic", "base_model": b, "parameters": {"lambda": 0.9},
                            "dtype": "float32"},
        "ties": {"models": [{"model": a, "parameters": {"density": 0.5, "weight": 0.5}},
                            {"model": c, "parameters": {"density": 0.5, "weight": 0.5}}],
                 "merge_method": "ties", "base_model": b, "parameters": {"normalize": True, "int8_mask": True},
                 "dtype": "float32"},
        "dare_ties_normalized": {"models": [{"model": a, "parameters": {"density": 0.6, "weight": 0.5}},
                                            {"model": c, "parameters": {"density": 0.6, "weight": 0.4}}],
                                 "merge_method": "dare_ties", "base_model": b,
                                 "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float32"},
        "slerp": {"slices": [{"sources": [{"model": a, "layer_range": [0, 2]}, {"model": c, "layer_range": [0, 2]}]}],
                  "merge_method": "slerp", "base_model": a, "parameters": {"t": 0.3}, "dtype": "float32"},
    }


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "dare_ties_normalized", "slerp"])
def test_yaml_equals_cli_with_equivalent_flags(name, tiny_models, tmp_path):
    from weightops.cli import app

    cfg = configs(tiny_models)[name]
    path = tmp_path / "mk.yml"
    path.write_text(yaml.safe_dump(cfg))
    tr = translate(path)
    cli = tr.equivalent_cli()
    assert cli is not None
    run_recipe(path, {"out": str(tmp_path / "yaml")}, quiet=True)  # `weightops run mk.yml --set out=...`
    r = CliRunner().invoke(app, shlex.split(cli)[1:] + ["--out", str(tmp_path / "cli"), "--quiet"])
    assert r.exit_code == 0, (cli, r.output)
    got, want = load(tmp_path / "yaml"), load(tmp_path / "cli")
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (name, k)
    if name == "linear":
        assert "--weights 1,0.3,0.5" in cli and "--dtype float16" in cli
    if name == "ties":
        assert "--trim-scope tensor" in cli and "--density 0.5" in cli
    if name == "dare_ties_normalized":
        assert "--drop-rate 0.4" in cli and "--rescale l1" in cli
    if name == "slerp":
        assert cli.split()[2:4] == [str(tiny_models["ft0"]), str(tiny_models["ft1"])] and "--t 0.3" in cli


def ref_ties_sum(base, models, weights, *, keep_prob=None, rescale_l1=True, lam=1.0, seed=0, densities=None):
    """mergekit's ties-consensus merge with normalize=false (sum of agreeing deltas), whole tensors."""
    f32 = lambda v: float(torch.tensor(float(v), dtype=torch.float32))  # noqa: E731
    out = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b
            continue
        bb = b.float().flatten()
        ds = []
        for i, m in enumerate(models):
            d = m[k].float().flatten() - bb
            keep = torch.ones_like(d, dtype=torch.bool)
            if densities is not None and densities[i] < 1:
                n = d.numel()
                kk = max(round(densities[i] * n), 1)
                keep &= d.abs() >= d.abs().kthvalue(n - kk + 1).values
            r = 1.0
            if keep_prob is not None and keep_prob < 1:
                keep &= philox_keep_mask(model_key(seed, i, k), 0, d.numel(), drop_threshold(1 - keep_prob))
                if rescale_l1:
                    tot = d.abs().sum(dtype=torch.float64).item()
                    kept = d.abs()[keep].sum(dtype=torch.float64).item()
                    r = tot / kept if tot >= 1e-7 and kept >= 1e-7 else 1.0
            ds.append(f32(weights[i]) * torch.where(keep, d * f32(r), torch.zeros_like(d)))
        s = sum(ds)
        agree = [torch.where(s >= 0, d > 0, d < 0) for d in ds]
        merged = sum(torch.where(a, d, torch.zeros_like(d)) for a, d in zip(agree, ds))
        out[k] = (bb + f32(lam) * merged).reshape(b.shape)
    return out


def test_dare_ties_default_normalize_false_sums_agreeing_deltas(tiny_models, tmp_path):
    t = tiny_models
    cfg = {"models": [{"model": str(t["ft0"]), "parameters": {"density": 0.53, "weight": 0.5}},
                      {"model": str(t["ft1"]), "parameters": {"density": 0.53, "weight": 0.3}},
                      {"model": str(t["ft2"]), "parameters": {"density": 0.53, "weight": 0.4}}],
           "merge_method": "dare_ties", "base_model": str(t["base"]), "parameters": {"int8_mask": True},
           "dtype": "float32"}
    tr = translate(cfg)
    assert tr.equivalent_cli() is None  # no `weightops merge` flag gives the unnormalised sum
    res = mergekit_merge(cfg, tmp_path / "m", seed=7, quiet=True, block_size=333)
    got = load(res.out)
    want = ref_ties_sum(t["base_sd"], [t["ft0_sd"], t["ft1_sd"], t["ft2_sd"]], [0.5, 0.3, 0.4], keep_prob=0.53, seed=7)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    assert any("int8_mask" in n for n in res.manifest["mergekit"]["notes"])


def test_ties_example_with_gradients_filters_and_per_model_density(tiny_models, tmp_path):
    """mergekit's examples/ties.yml shape: a density gradient, a weight gradient, a filtered weight."""
    t = tiny_models
    cfg = {"models": [{"model": str(t["ft0"]), "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                      {"model": str(t["ft1"]), "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                      {"model": str(t["ft2"]), "parameters": {"density": 0.33,
                                                               "weight": [{"filter": "intermediate", "value": 0.5},
                                                                          {"value": 0}]}}],
           "merge_method": "ties", "base_model": str(t["base"]), "parameters": {"normalize": False, "int8_mask": True},
           "dtype": "float32"}
    skip = r"^classifier"  # --exclude still applies: copied from the base
    got = load(mergekit_merge(cfg, tmp_path / "m", quiet=True, block_size=17, exclude=skip).out)
    base, ms = t["base_sd"], [t["ft0_sd"], t["ft1_sd"], t["ft2_sd"]]
    n_layers = 2
    for k in base:
        if re.search(skip, k) or not base[k].is_floating_point():
            assert torch.equal(got[k], base[k])
            continue
        layer = [int(p) for p in k.split(".") if p.isdigit()]
        tt = layer[0] / (n_layers - 1) if "layer." in k else 0.0
        assert k != "embeddings.weight" or tt == 0.0
        dens = [evaluate_setting(k, [1, 0.7, 0.1], tt), 0.5, 0.33]
        w = [1.0, evaluate_setting(k, [0, 0.3, 0.7, 1], tt), 0.5 if "intermediate" in k else 0.0]
        want = ref_ties_sum({k: base[k]}, [{k: m[k]} for m in ms], w, densities=dens)[k]
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6, msg=k)


def test_evaluate_setting_follows_mergekit():
    assert evaluate_setting("x", 0.5, 0.3) == 0.5
    assert evaluate_setting("x", [1, 0.7, 0.1], 0.0) == 1
    assert math.isclose(evaluate_setting("x", [1, 0.7, 0.1], 0.25), 0.85)
    assert math.isclose(evaluate_setting("x", [1, 0.7, 0.1], 1.0), 0.1)
    f = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.2}, {"value": 0.5}]
    assert evaluate_setting("l.3.self_attn.q", f, 0.5) == 0.5 and evaluate_setting("l.mlp.up", f, 0.9) == 0.2
    assert evaluate_setting("norm", f, 0.0) == 0.5
    assert evaluate_setting("norm", [{"filter": "mlp", "value": 1}], 0.0) is None


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.update(merge_method="frobnicate"), "frobnicate.*not a mergekit"),
    (lambda c: c.update(base_model="nobody-here/Llama-2-7b-hf"), "not in the Hugging Face cache"),
    (lambda c: c["models"][0]["parameters"].update(epsilon=0.1), "epsilon"),
    (lambda c: c["models"][0]["parameters"].pop("weight"), "weight"),
    (lambda c: c.update(slices=[{"sources": []}]) or c.pop("models"), "sources"),
    (lambda c: c["models"][1]["parameters"].update(density=0.9), "per-model density"),
])
def test_unsupported_is_named(mutate, match, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    t = tiny_models
    cfg = {"models": [{"model": str(t["ft0"]), "parameters": {"density": 0.5, "weight": 0.5}},
                      {"model": str(t["ft1"]), "parameters": {"density": 0.5, "weight": 0.5}}],
           "merge_method": "dare_ties", "base_model": str(t["base"])}
    mutate(cfg)
    with pytest.raises(WeightopsError, match=match):
        mergekit_merge(cfg, tmp_path / "m", quiet=True)
    assert not (tmp_path / "m").exists()


def test_run_needs_out(tiny_models, tmp_path):
    path = tmp_path / "mk.yml"
    path.write_text(yaml.safe_dump(configs(tiny_models)["linear"]))
    with pytest.raises(WeightopsError, match="out"):
        run_recipe(path, {}, quiet=True)
