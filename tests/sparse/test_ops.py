"""Mask set operations and overlap, LT-SFT composition, HFT-style reset."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import make_bert_state, write_model
from weightops.errors import AlignmentError, WeightopsError
from weightops.io.checkpoint import Checkpoint
from weightops.sparse import open_sparse, write_mask, write_sparse_delta
from weightops.sparse import reference as ref
from weightops.sparse.compose import REPORT_NAME, compose
from weightops.sparse.masks import combine_masks, overlap, overlap_heatmap, overlap_table
from weightops.sparse.reset import hft_reset_tensors, reset


def _sets(path):
    f = open_sparse(path)
    return {n: set(f.indices(n).tolist()) for n in f.tensors}


def test_union_intersection_and_overlap(tmp_path):
    a = [("encoder.layer.0.w", (10,), torch.float32, torch.tensor([0, 2, 4, 6])),
         ("encoder.layer.1.w", (3, 3), torch.float32, torch.tensor([1])),
         ("head", (4,), torch.float32, None)]
    b = [("encoder.layer.0.w", (10,), torch.float32, torch.tensor([2, 3, 4])),
         ("encoder.layer.1.w", (3, 3), torch.float32, torch.tensor([], dtype=torch.int64)),
         ("head", (4,), torch.float32, torch.tensor([3]))]
    write_mask(tmp_path / "a", a)
    write_mask(tmp_path / "b", b)
    u = _sets(combine_masks([tmp_path / "a", tmp_path / "b"], tmp_path / "u", "union"))
    i = _sets(combine_masks([tmp_path / "a", tmp_path / "b"], tmp_path / "i", "intersection"))
    assert u == {"encoder.layer.0.w": {0, 2, 3, 4, 6}, "encoder.layer.1.w": {1}, "head": {0, 1, 2, 3}}
    assert i == {"encoder.layer.0.w": {2, 4}, "encoder.layer.1.w": set(), "head": {3}}
    rep = overlap([tmp_path / "a", tmp_path / "b"], labels=["A", "B"])
    o = rep["overall"]
    assert o["size"] == [4 + 1 + 4, 3 + 0 + 1] and o["intersection"][0][1] == 2 + 0 + 1
    assert o["jaccard"][0][1] == pytest.approx(3 / (9 + 4 - 3))
    assert o["asym"][0][1] == pytest.approx(3 / 4) and o["asym"][1][0] == pytest.approx(3 / 9)
    assert rep["per_layer"]["layer 0"]["jaccard"][0][1] == pytest.approx(2 / 5)
    assert list(rep["per_layer"]) == ["layer 0", "layer 1", "other"]
    assert "A vs B" in overlap_table(rep)
    png = overlap_heatmap(rep, tmp_path / "o.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_mask(tmp_path / "c", [("head", (5,), torch.float32, None)])
    with pytest.raises(AlignmentError):
        overlap([tmp_path / "a", tmp_path / "c"])


@pytest.fixture(scope="module")
def fp16_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    base = make_bert_state(11, torch.float16)
    ft = make_bert_state(12, base=base, scale=0.05)
    return {"base": write_model(root / "base", base), "ft": write_model(root / "ft", ft), "base_sd": base, "ft_sd": ft}


def _random_delta(base_sd, names, seed, density=0.3, avoid=None):
    g = torch.Generator().manual_seed(seed)
    entries, dense = [], {}
    for n in names:
        t = base_sd[n]
        keep = torch.rand(t.numel(), generator=g) < density
        if avoid is not None and n in avoid:
            keep &= ~avoid[n]
        idx = keep.nonzero().flatten()
        vals = torch.randn(idx.numel(), generator=g) * 0.01
        entries.append((n, tuple(t.shape), t.dtype, idx, vals))
        d = torch.zeros(t.numel())
        d[idx] = vals
        dense[n] = (d.reshape(t.shape), keep)
    return entries, dense


def test_compose_disjoint_equals_dense_sum(tmp_path, fp16_models):
    base_sd = fp16_models["base_sd"]
    floats = [n for n, v in base_sd.items() if v.is_floating_point()]
    e1, d1 = _random_delta(base_sd, list(dict.fromkeys(floats[::2] + floats[1:4])), 1)
    e2, d2 = _random_delta(base_sd, floats[1::3], 2, avoid={n: k for n, (_, k) in d1.items()})
    write_sparse_delta(tmp_path / "d1", e1)
    write_sparse_delta(tmp_path / "d2", e2)
    res, rep = compose(fp16_models["base"], [tmp_path / "d1", tmp_path / "d2"], tmp_path / "out", block_size=333)
    assert rep["disjoint"] and rep["pairs"][0]["overlap"] == 0
    want = ref.add_deltas(base_sd, [{n: d for n, (d, _) in d1.items()}, {n: d for n, (d, _) in d2.items()}], [1.0, 1.0])
    got = Checkpoint(tmp_path / "out").load()
    for n in base_sd:
        assert torch.equal(got[n], want[n]), n
    assert json.loads((tmp_path / "out" / REPORT_NAME).read_text())["disjoint"] is True


def test_compose_reports_overlaps_and_sign_conflicts(tmp_path, fp16_models):
    n = "encoder.layer.0.attention.self.query.weight"
    shape, dt = tuple(fp16_models["base_sd"][n].shape), torch.float16
    write_sparse_delta(tmp_path / "a", [(n, shape, dt, torch.tensor([1, 5, 9]), torch.tensor([0.1, 0.1, -0.1]))])
    write_sparse_delta(tmp_path / "b", [(n, shape, dt, torch.tensor([5, 9, 11]), torch.tensor([-0.2, -0.3, 0.1]))])
    _, rep = compose(fp16_models["base"], [tmp_path / "a", tmp_path / "b"], tmp_path / "out", scales=[1.0, 0.5])
    p = rep["pairs"][0]
    assert (p["overlap"], p["sign_conflicts"]) == (2, 1) and not rep["disjoint"]
    assert p["per_layer"] == {"layer 0": {"overlap": 2, "sign_conflicts": 1}}
    got = Checkpoint(tmp_path / "out").load([n])[n].flatten()
    b = fp16_models["base_sd"][n].float().flatten()
    assert got[5] == (b[5] + 0.1 - 0.5 * 0.2).half() and got[11] == (b[11] + 0.5 * 0.1).half()


@pytest.mark.parametrize("by", ["parameter", "row", "tensor"])
def test_reset_matches_reference_and_is_block_independent(tmp_path, fp16_models, by):
    base_sd, ft_sd = fp16_models["base_sd"], fp16_models["ft_sd"]
    outs = []
    for bs in (7, 1 << 20):
        reset(fp16_models["base"], fp16_models["ft"], tmp_path / f"r{bs}", fraction=0.4, by=by, seed=3, block_size=bs)
        outs.append(Checkpoint(tmp_path / f"r{bs}").load())
    n_reset = n_elig = 0
    for n, t in base_sd.items():
        assert torch.equal(outs[0][n], outs[1][n]), n
        if ".layer." in n and t.is_floating_point():
            keep = ref.reset_keep_mask(n, tuple(t.shape), 0.4, by, 3)
            assert torch.equal(outs[0][n], torch.where(keep, ft_sd[n], t)), n
            n_reset += int((~keep).sum())
            n_elig += t.numel()
        else:
            assert torch.equal(outs[0][n], ft_sd[n]), n  # outside the layers: fine-tuned, untouched
    man = json.loads((tmp_path / "r7" / "weightops.json").read_text())
    assert man["reset"]["stats"] == {"eligible": n_elig, "reset": n_reset}
    if by == "parameter":
        assert 0.35 < n_reset / n_elig < 0.45
    # another seed gives another mask
    reset(fp16_models["base"], fp16_models["ft"], tmp_path / "other", fraction=0.4, by=by, seed=4)
    other = Checkpoint(tmp_path / "other").load()
    assert any(not torch.equal(other[n], outs[0][n]) for n in base_sd)


def test_reset_hft_rule(tmp_path, fp16_models):
    base_sd, ft_sd = fp16_models["base_sd"], fp16_models["ft_sd"]
    reset(fp16_models["base"], fp16_models["ft"], tmp_path / "h", by="hft", seed=0)
    got = Checkpoint(tmp_path / "h").load()
    chosen, info = hft_reset_tensors([n for n in base_sd if ".layer." in n], 0)
    per_layer = {}
    for n in base_sd:
        want = base_sd[n] if n in chosen else ft_sd[n]
        assert torch.equal(got[n], want), n
        if n in chosen and n.endswith("weight") and "LayerNorm" not in n:
            layer = n.split(".layer.")[1].split(".")[0]
            per_layer[layer] = per_layer.get(layer, 0) + 1
    assert set(per_layer.values()) == {3}  # BERT: 2 of 4 attention + 1 of 2 FFN matrices per layer
    with pytest.raises(WeightopsError, match="--by must be"):
        reset(fp16_models["base"], fp16_models["ft"], tmp_path / "x", by="neuron")
    with pytest.raises(WeightopsError, match="--fraction"):
        reset(fp16_models["base"], fp16_models["ft"], tmp_path / "x", fraction=1.5)
    assert not (tmp_path / "x").exists()
