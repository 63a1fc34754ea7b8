"""Data-free grafting: exact global top-k with the documented tie rule, against the whole-tensor reference."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import write_model
from weightops.errors import AlignmentError, WeightopsError
from weightops.io.checkpoint import Checkpoint
from weightops.sparse import open_sparse
from weightops.sparse import reference as ref
from weightops.sparse.graft import DEFAULT_SCOPE, graft, make_graft_mask

SHAPES = {
    "emb.weight": (11, 5),                      # out of scope
    "encoder.layer.0.attn.weight": (7, 13),
    "encoder.layer.0.attn.bias": (7,),
    "encoder.layer.0.one": (1,),
    "encoder.layer.0.empty": (0,),
    "encoder.layer.1.ffn.weight": (3, 5, 9),
    "encoder.layer.1.norm.weight": (40,),
    "classifier.weight": (2, 5),                # the head
    "position_ids": (1, 6),                     # int buffer
}


def _pair(seed: int, dtype, ties: bool):
    """base + fine-tune; with `ties`, deltas come from a few levels so |δ| ties massively."""
    g = torch.Generator().manual_seed(seed)
    base, ft = {}, {}
    for n, s in SHAPES.items():
        if n == "position_ids":
            base[n] = ft[n] = torch.arange(6).reshape(s)
            continue
        b = torch.randn(s, generator=g).to(dtype)
        if ties:
            levels = torch.tensor([0.0, 0.25, -0.25, 0.5, -0.5, 1.0])
            d = levels[torch.randint(0, 6, s, generator=g)]
            f = (b.float() + d).to(dtype)
            # make |f - b| exactly a level in the working dtype too
            f = (b.float() + (f.float() - b.float())).to(dtype)
        else:
            f = (b.float() + 0.1 * torch.randn(s, generator=g)).to(dtype)
        base[n], ft[n] = b, f
    return base, ft


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("graft")
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for ties in (False, True):
            base, ft = _pair(1, dtype, ties)
            key = (dtype, ties)
            out[key] = (write_model(root / f"b{dtype}{ties}", base), write_model(root / f"f{dtype}{ties}", ft, shards=2), base, ft)
    return out


def _mask_dict(path):
    f = open_sparse(path)
    out = {}
    for n, t in f.tensors.items():
        m = torch.zeros(t.numel, dtype=torch.bool)
        m[f.indices(n)] = True
        out[n] = m.reshape(t.shape)
    return f, out


ELIG = [n for n in SHAPES if "layer." in n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_exact_and_equal_to_reference(tmp_path, pairs, dtype, ties):
    b, f, base, ft = pairs[(dtype, ties)]
    n_elig = sum(base[n].numel() for n in ELIG)
    for i, k in enumerate([1, 7, 100, n_elig - 1, n_elig]):
        for bs in (5, 1 << 20):
            p = make_graft_mask(b, f, tmp_path / f"m{i}-{bs}", k=k, block_size=bs)
            sf, got = _mask_dict(p)
            assert sf.nnz == k, (k, bs)
            assert sorted(got) == sorted(ELIG)  # empty and 1-element tensors listed; embeddings / head / ints not
            order = [n for n in Checkpoint(b).infos if n in ELIG]  # the tie rule follows the base's tensor order
            want = ref.top_delta_mask(base, ft, order, k)
            for n in ELIG:
                assert torch.equal(got[n], want[n]), (n, k, bs)
            assert sf.manifest["method"]["k"] == k and sf.manifest["method"]["n_eligible"] == n_elig


def test_sparsity_rounding_and_ties_reported(tmp_path, pairs):
    b, f, base, ft = pairs[(torch.float32, True)]
    n_elig = sum(base[n].numel() for n in ELIG)
    p = make_graft_mask(b, f, tmp_path / "m", sparsity=0.1)
    man = open_sparse(p).manifest
    assert man["nnz"] == round(0.1 * n_elig)
    assert man["method"]["ties_taken"] > 0  # the level data force ties at the threshold
    assert man["method"]["ties_taken"] + man["method"]["n_above_threshold"] == man["nnz"]
    assert {s["role"] for s in man["sources"]} == {"base", "finetuned"}
    p = make_graft_mask(b, f, tmp_path / "tiny", sparsity=1e-9)
    assert open_sparse(p).nnz == 1  # a positive sparsity selects at least one element


def test_graft_model_equals_reference_and_whole_head(tmp_path, pairs):
    b, f, base, ft = pairs[(torch.bfloat16, False)]
    res = graft(b, f, out=tmp_path / "g", mask_out=tmp_path / "m", k=50, whole="^classifier\\.", block_size=17)
    _, masks = _mask_dict(tmp_path / "m")
    assert masks["classifier.weight"].all()
    want = ref.apply_mask(base, ft, masks)
    got = Checkpoint(tmp_path / "g").load()
    for n in base:
        assert torch.equal(got[n], want[n]), n
    assert res["nnz"] == 50 + base["classifier.weight"].numel()
    # the sparse delta of the same selection composes back to the same model (fp32 here: exact for bf16)
    graft(b, f, delta_out=tmp_path / "d", k=50, whole="^classifier\\.")
    from weightops.sparse import apply_sparse_delta

    apply_sparse_delta(b, tmp_path / "d", tmp_path / "g2", quiet=True)
    got2 = Checkpoint(tmp_path / "g2").load()
    for n in base:
        assert torch.equal(got2[n], got[n]), n


def test_default_scope_matches_common_layouts():
    import re

    rx = re.compile(DEFAULT_SCOPE)
    for n in ("encoder.layer.3.attention.self.query.weight", "bert.encoder.layer.0.output.LayerNorm.bias",
              "model.layers.12.mlp.up_proj.weight", "transformer.h.0.attn.c_attn.weight", "layers.0.x"):
        assert rx.search(n), n
    for n in ("embeddings.word_embeddings.weight", "classifier.weight", "model.norm.weight", "lm_head.weight",
              "bert.pooler.dense.weight"):
        assert not rx.search(n), n


def test_bad_arguments(tmp_path, pairs, tiny_models):
    b, f, *_ = pairs[(torch.float32, False)]
    with pytest.raises(WeightopsError, match="sparsity must be in"):
        make_graft_mask(b, f, tmp_path / "m", sparsity=2.0)
    with pytest.raises(WeightopsError, match="no tensor matches"):
        make_graft_mask(b, f, tmp_path / "m", sparsity=0.1, scope="^nothing$")
    with pytest.raises(WeightopsError, match="nothing to write"):
        graft(b, f, sparsity=0.1)
    with pytest.raises(AlignmentError):
        make_graft_mask(b, tiny_models["ft0"], tmp_path / "m", sparsity=0.1)
    assert not (tmp_path / "m").exists()


def test_kth_largest_abs_with_counts_brute_force():
    """The shared op's `with_counts` (added for exact top-k): n_above = #{|x| > kth}."""
    from weightops.ops import kth_largest_abs

    g = torch.Generator().manual_seed(5)
    x = torch.randint(-4, 5, (997,), generator=g).float() / 4
    base = torch.randn(997, generator=g) * 0  # exercise the (x, base) form too
    blocks = lambda: [(x[s:s + 100], base[s:s + 100]) for s in range(0, 997, 100)]  # noqa: E731
    a = x.abs()
    for k in (1, 2, 50, 500, 996, 997):
        ((t, above),) = kth_largest_abs(blocks, [k], with_counts=True)
        assert t == torch.sort(a, descending=True).values[k - 1].item()
        assert above == int((a > t).sum())
    with pytest.raises(ValueError):
        kth_largest_abs(blocks, [998], with_counts=True)
    assert kth_largest_abs(blocks, [3]) == [torch.sort(a, descending=True).values[2].item()]


def test_lora_adapter_grafts_like_its_merged_model(tmp_path, tiny_models):
    """A PEFT adapter is read as θ0 + ΔW block by block: same mask as the materialised model."""
    from tests.engine.test_hf_and_adapters import _adapter
    from weightops.engine import merge

    adapter, _ = _adapter(tmp_path, tiny_models["base"], rslora=False)
    merge([adapter], base=tiny_models["base"], method="linear", out=tmp_path / "merged", quiet=True)
    a = make_graft_mask(tiny_models["base"], adapter, tmp_path / "ma", sparsity=0.01)
    b = make_graft_mask(tiny_models["base"], tmp_path / "merged", tmp_path / "mb", sparsity=0.01)
    assert (a / "sparse.safetensors").read_bytes() == (b / "sparse.safetensors").read_bytes()
    assert open_sparse(a).manifest["sources"][1]["kind"] != "checkpoint"
