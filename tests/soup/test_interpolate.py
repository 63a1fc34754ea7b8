"""WiSE-FT interpolation through the streaming engine against whole-tensor references."""
from __future__ import annotations

import json
import math

import pytest
import torch

from checkpoints import make_bert_state, write_model
from weightops.errors import OutputError, WeightopsError
from weightops.interpolate import (groups_of, interpolate, layer_group, parse_alphas, path_stats, rank_stragglers,
                                   sweep)
from weightops.io.checkpoint import Checkpoint


# --- whole-tensor references (straight from shared/methods.md) ------------------------------
def ref_keep(b: torch.Tensor, f: torch.Tensor, density: float) -> torch.Tensor:
    """The top round(density·n) |δ| (at least 1), by kthvalue on the whole tensor."""
    d = (f.float() - b.float()).abs().flatten()
    n = d.numel()
    if n == 0:
        return torch.zeros(b.shape, dtype=torch.bool)
    k = max(round(density * n), 1)
    return (d >= d.kthvalue(n - k + 1).values).reshape(b.shape)


def ref_interpolate(base: dict, ft: dict, alpha_of, density_of=lambda n: 1.0) -> dict:
    """(1−α)·θ0 + α·θft in fp32; sparsified tensors θ0 + α·keep⊙δ."""
    out = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b
            continue
        a = alpha_of(k)
        w0, w1 = torch.tensor([1.0 - a, a], dtype=torch.float64).float().tolist()
        if density_of(k) < 1:
            d = ft[k].float() - b.float()
            kept = torch.where(ref_keep(b, ft[k], density_of(k)), d, torch.zeros_like(d))
            out[k] = (b.float() + (w1 * kept)).to(b.dtype)
        else:
            out[k] = (w0 * b.float() + w1 * ft[k].float()).to(b.dtype)
    return out


def odd_state(seed: int, dtype, base=None) -> dict:
    """Odd shapes, an empty and a 1-element tensor, an integer buffer, two 'layers'."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb.weight": (7, 5), "layers.0.w": (13, 3), "layers.0.b": (1,), "layers.1.w": (11, 9),
              "layers.1.empty": (0, 4), "head.weight": (3,)}
    if base is None:
        sd = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
        sd["pos_ids"] = torch.arange(6)
        return sd
    return {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point() else v.clone()
            for k, v in base.items()}


def load(path) -> dict:
    c = Checkpoint(path)
    sd = c.load(list(c.infos))
    c.close()
    return sd


@pytest.fixture(params=[torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def pair(request, tmp_path):
    base = odd_state(0, request.param)
    ft = odd_state(1, request.param, base)
    return base, ft, write_model(tmp_path / "base", base), write_model(tmp_path / "ft", ft, shards=2)


@pytest.mark.parametrize("block_size", [4, 1 << 20])
def test_endpoints_reproduce_inputs_bit_for_bit(pair, tmp_path, block_size):
    base, ft, bdir, fdir = pair
    for a, want in ((0.0, base), (1.0, ft)):
        got = load(interpolate(bdir, fdir, out=tmp_path / f"a{a}", alpha=a, quiet=True, block_size=block_size).out)
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("block_size", [5, 1 << 20])
def test_midpoint_and_sparsified_match_reference(pair, tmp_path, block_size):
    base, ft, bdir, fdir = pair
    got = load(interpolate(bdir, fdir, out=tmp_path / "m", alpha=0.3, quiet=True, block_size=block_size).out)
    want = ref_interpolate(base, ft, lambda n: 0.3)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    rx = r"^layers\.1\.|^head"
    got = load(interpolate(bdir, fdir, out=tmp_path / "s", alpha=0.6, sparsify=rx, density=0.25, quiet=True,
                           block_size=block_size).out)
    want = ref_interpolate(base, ft, lambda n: 0.6, lambda n: 0.25 if n.startswith(("layers.1.", "head")) else 1.0)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # the sparsified tensors really changed fewer elements than the dense ones
    w = "layers.1.w"
    assert (got[w] != base[w]).float().mean().item() <= 0.25 + 1 / base[w].numel()


def test_per_group_alpha_changes_only_that_group(pair, tmp_path):
    base, ft, bdir, fdir = pair
    got = load(interpolate(bdir, fdir, out=tmp_path / "g", alpha=1.0, alphas={"layer.0": 0.0}, quiet=True).out)
    for k in base:
        want = base[k] if k.startswith("layers.0.") else ft[k]
        assert torch.equal(got[k], want), k
    got = load(interpolate(bdir, fdir, out=tmp_path / "h", alpha=0.0, alphas={"layer.1": 0.5}, quiet=True).out)
    ref = ref_interpolate(base, ft, lambda n: 0.5 if n.startswith("layers.1.") else 0.0)
    for k in base:
        assert torch.equal(got[k], ref[k]), k
        if not k.startswith("layers.1.") and base[k].numel():
            assert torch.equal(got[k], base[k])


def test_layer_groups():
    assert layer_group("bert.encoder.layer.11.attention.self.query.weight") == "layer.11"
    assert layer_group("model.layers.3.mlp.up_proj.weight") == "layer.3"
    assert layer_group("transformer.h.2.attn.c_attn.weight") == "layer.2"
    assert layer_group("model.norm.weight") == "norm"
    assert layer_group("lm_head.weight") == "lm_head"
    assert layer_group("bert.embeddings.word_embeddings.weight") == "embeddings"
    assert layer_group("x.attn.q", "tensor") == "x.attn.q"
    assert layer_group("a.q_proj.w", r"(q|k|v)_proj") == "q" and layer_group("a.o.w", r"(q|k|v)_proj") == "other"
    names = ["emb.w", "layers.10.a", "layers.2.a", "layers.2.b", "norm.w", "head.w"]
    assert list(groups_of(names)) == ["emb", "layer.2", "layer.10", "norm", "head"]


def test_parse_alphas():
    assert parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_alphas("0:1:0.1")[-1] == 1.0 and len(parse_alphas("0:1:0.1")) == 11
    assert parse_alphas("-0.5,1.5") == [-0.5, 1.5]
    for bad in ("0:1", "0:1:0", "a,b", ""):
        with pytest.raises(WeightopsError):
            parse_alphas(bad)


def test_bad_arguments(pair, tmp_path):
    _, _, bdir, fdir = pair
    with pytest.raises(WeightopsError, match="density"):
        interpolate(bdir, fdir, out=tmp_path / "x", density=0.0, sparsify="w")
    with pytest.raises(WeightopsError, match="regex"):
        interpolate(bdir, fdir, out=tmp_path / "x", density=0.5, sparsify="(")
    assert not (tmp_path / "x").exists()


def test_path_stats_closed_forms(pair):
    base, ft, bdir, fdir = pair
    alphas = [0.0, 0.4, 1.0]
    st = path_stats(bdir, fdir, alphas=alphas, sparsify="^layers", density=0.5, block_size=7)
    for g, names in groups_of([k for k, v in base.items() if v.is_floating_point()]).items():
        b = torch.cat([base[n].double().flatten() for n in names])
        f = torch.cat([ft[n].double().flatten() for n in names])
        dens = 0.5 if g.startswith("layer") else 1.0
        kept = torch.cat([((ft[n].double() - base[n].double()) * ref_keep(base[n], ft[n], dens)).flatten()
                          for n in names])
        row = st[g]
        assert row["delta_norm"] == pytest.approx((f - b).norm().item(), rel=1e-6)
        assert row["rel_delta"] == pytest.approx((f - b).norm().item() / b.norm().item(), rel=1e-6)
        for i, a in enumerate(alphas):
            th = b + a * kept
            assert row["cos_to_base"][i] == pytest.approx((th @ b / (th.norm() * b.norm())).item(), rel=1e-4, abs=1e-6)
            assert row["dist_to_ft"][i] == pytest.approx(((th - f).norm() / (f - b).norm()).item(), rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bp")
    base = make_bert_state(0)
    ft = make_bert_state(5, base=base, scale=0.05)
    return base, ft, write_model(root / "base", base), write_model(root / "ft", ft)


def test_sweep_curve_per_layer_and_report(bert_pair, tmp_path):
    base, ft, bdir, fdir = bert_pair
    ref = base["pooler.dense.weight"]

    def dist(m):  # distance of the pooler to the base's: 0 at α=0, grows along the path
        return -float((load(m)["pooler.dense.weight"] - ref).norm())

    def emb(m):
        return -float((load(m)["embeddings.word_embeddings.weight"] - base["embeddings.word_embeddings.weight"]).norm())

    res = sweep(bdir, fdir, alphas="0:1:0.5", evals={"pool": dist, "emb": emb}, out=tmp_path / "r", per_layer=True,
                quiet=True)
    assert res["curve"]["pool"][0] == 0.0
    assert res["curve"]["pool"][2] == pytest.approx(dist(fdir))
    assert res["curve"]["pool"][1] == pytest.approx(dist(fdir) / 2, rel=1e-5)
    assert set(res["per_layer"]) == {"embeddings", "layer.0", "layer.1", "pooler"}
    # sweeping only the pooler's α moves the pooler score; other groups leave it at the fine-tune's
    assert res["per_layer"]["layer.0"]["pool"] == [pytest.approx(dist(fdir))] * 3
    assert res["stragglers"]["pool"][0]["group"] == "pooler" and res["stragglers"]["emb"][0]["group"] == "embeddings"
    assert res["stragglers"]["pool"][0]["best_alpha"] == 0.0
    saved = json.loads((tmp_path / "r" / "interpolation.json").read_text())
    assert saved["curve"] == res["curve"] and (tmp_path / "r" / "curve.png").stat().st_size > 0
    assert (tmp_path / "r" / "per_layer.png").is_file()
    with pytest.raises(OutputError):
        sweep(bdir, fdir, alphas="0,1", evals=dist, out=tmp_path / "r", quiet=True)


def test_sweep_failure_leaves_nothing(bert_pair, tmp_path):
    _, _, bdir, fdir = bert_pair

    def boom(m):
        raise WeightopsError("evaluator failed")

    with pytest.raises(WeightopsError):
        sweep(bdir, fdir, alphas="0,1", evals=boom, out=tmp_path / "r", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_rank_stragglers():
    r = rank_stragglers({"a": {"s": [0.5, 0.5]}, "b": {"s": [0.1, 0.9]}}, [0.0, 1.0])
    assert [x["group"] for x in r["s"]] == ["b", "a"] and r["s"][0]["best_alpha"] == 1.0
    assert math.isclose(r["s"][0]["range"], 0.8)


def test_merge_back_with_base_is_linear_merge(pair, tmp_path):
    """The documented recipe `weightops merge BASE FT --method linear --weights 0.7,0.3` is θ(0.3)."""
    from weightops.engine import merge

    _, _, bdir, fdir = pair
    a = load(interpolate(bdir, fdir, out=tmp_path / "i", alpha=0.3, quiet=True).out)
    b = load(merge([bdir, fdir], method="linear", weights=[0.7, 0.3], out=tmp_path / "m", quiet=True).out)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_interpolate(bert_pair, tmp_path):
    from typer.testing import CliRunner

    from weightops.cli import app

    base, ft, bdir, fdir = bert_pair
    r = CliRunner().invoke(app, ["interpolate", str(bdir), str(fdir), "--alpha", "0", "--out", str(tmp_path / "m"), "-q"])
    assert r.exit_code == 0, r.output
    assert all(torch.equal(v, base[k]) for k, v in load(tmp_path / "m").items())
    ev = tmp_path / "ev.py"
    ev.write_text("from safetensors.torch import load_file\n"
                  "def score(m):\n    return float(load_file(str(m) + '/model.safetensors')['pooler.dense.bias'].sum())\n")
    r = CliRunner().invoke(app, ["interpolate", str(bdir), str(fdir), "--alphas", "0,1", "--eval", f"b={ev}:score",
                                 "--out", str(tmp_path / "r"), "--no-plot", "--no-cache"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r" / "interpolation.json").read_text())
    assert rep["curve"]["b"] == pytest.approx([float(base["pooler.dense.bias"].sum()), float(ft["pooler.dense.bias"].sum())])
    assert "alpha" in r.output and not (tmp_path / "r" / "curve.png").exists()
    r = CliRunner().invoke(app, ["interpolate", str(bdir), str(fdir), "--out", str(tmp_path / "x")])
    assert isinstance(r.exception, WeightopsError) and not (tmp_path / "x").exists()
