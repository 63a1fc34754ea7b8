"""Intruder analysis: planted intruders, fast paths vs the full-SVD reference, adapters, cache, edge cases."""
from __future__ import annotations

import math

import pytest
import torch

from weightops.errors import WeightopsError
from weightops.spectral import Options, analyse
from weightops.spectral import reference as ref
from weightops.spectral import svd as S
from weightops.spectral.intruders import analyse_matrix

from _spectral import bert_like, lora_scale, save_adapter, save_ckpt, spectral_matrix, spread_direction

GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _analyse_dense(W0, W, solver="fast", k=10, name="layer.0.q.weight"):
    return analyse_matrix(name, W0.reshape(-1), tuple(W0.shape), W=W, base_svd=S.full_svd(W0),
                          opts=Options(top_k=k, solver=solver, eps_grid=GRID))


@pytest.mark.parametrize("shape", [(120, 120), (150, 96), (96, 150)])
def test_planted_intruders_found_exactly(shape):
    """W = W0 + Σ s·u·vᵀ with u spread outside W0's top subspace: the report names exactly those ranks."""
    g = torch.Generator().manual_seed(3)
    W0, U0, s0, V0 = spectral_matrix(*shape, g)
    W = W0.clone()
    planted = []
    for strength in (3.0, 2.0):  # above σ1 = 1: ranks 1 and 2
        u = spread_direction(U0, 20, g)
        v = torch.randn(shape[1], generator=g)
        W += strength * torch.outer(u, v / v.norm())
        planted.append(u)
    for solver in ("fast", "exact"):
        r = _analyse_dense(W0, W, solver)
        assert r.intruders(0.5) == [0, 1], (solver, r.best_cos)
        # the intruders are the planted directions, and the others are the base's own top vectors
        top = torch.linalg.svd(W, full_matrices=False).U[:, :2]
        assert all((top.T @ u).abs().max() > 0.9 for u in planted)
        assert min(r.best_cos[2:]) > 0.9
        assert r.best_cos[:2] == pytest.approx(ref.best_cosines(W0, W)[:2].tolist(), abs=1e-4)


def test_planted_intruder_in_the_middle_of_the_spectrum():
    g = torch.Generator().manual_seed(4)
    W0, U0, s0, _ = spectral_matrix(128, 128, g)
    u = spread_direction(U0, 30, g)
    v = torch.randn(128, generator=g)
    W = W0 + float(s0[3] + s0[4]) / 2 * torch.outer(u, v / v.norm())  # between σ4 and σ5: rank 5
    r = _analyse_dense(W0, W)
    assert r.intruders(0.5) == [4]
    assert ref.count_intruders(W0, W) == 1


def test_no_intruders_for_small_random_perturbation():
    g = torch.Generator().manual_seed(5)
    W0, *_ = spectral_matrix(128, 96, g)
    W = W0 + 1e-3 * torch.randn(W0.shape, generator=g) / math.sqrt(128)
    for solver in ("fast", "exact"):
        r = _analyse_dense(W0, W, solver)
        assert r.intruders(0.5) == [] and min(r.best_cos) > 0.99
    assert ref.count_intruders(W0, W) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_equals_reference_on_generated_models(tmp_path, family, dtype):
    """Every matrix, every ε of the grid: fast counts == exact counts == the paper's algorithm."""
    base = {k: v.to(dtype) for k, v in family["base_sd"].items()}
    ft = {k: v.to(dtype) for k, v in family["ft_sd"].items()}
    bdir, fdir = save_ckpt(tmp_path / "b", base), save_ckpt(tmp_path / "f", ft)
    # a second fine-tune with planted rank-2 intruders in every matrix: counts are non-trivial
    g = torch.Generator().manual_seed(7)
    ft2 = {k: (v.float() + 2.0 * torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g)
               / math.sqrt(v.numel())).to(dtype) if v.ndim == 2 and "encoder" in k else v for k, v in base.items()}
    f2dir = save_ckpt(tmp_path / "f2", ft2)
    reps = {s: analyse(str(bdir), [str(fdir), str(f2dir)], opts=Options(solver=s, eps_grid=GRID, cache_dir=None), quiet=True)
            for s in ("fast", "exact")}
    fast, exact = reps["fast"], reps["exact"]
    for tf, te, sd in zip(fast["targets"], exact["targets"], (ft, ft2)):
        assert tf["counts_vs_eps"] == te["counts_vs_eps"]
        assert tf["n_matrices"] == 12  # 2 layers × 6 linear weights; no embeddings, norms, biases, pooler, head
        for mf, me in zip(tf["matrices"], te["matrices"]):
            assert mf["counts"] == me["counts"], mf["name"]
            want = ref.best_cosines(base[mf["name"]], sd[mf["name"]])
            assert mf["best_cos"] == pytest.approx(want.tolist(), abs=2e-4)
        assert "subspace" in tf["solvers"]  # the fast path was really used
    assert fast["targets"][0]["total"] < fast["targets"][1]["total"]
    assert fast["targets"][1]["total"] >= 12 * 2


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_low_rank_path_equals_reference(tmp_path, family, rslora):
    r, alpha = family["r"], family["alpha"]
    ad = save_adapter(tmp_path / "a", family["factors"], r, alpha, rslora=rslora)
    reps = {s: analyse(str(family["base"]), [str(ad)], opts=Options(solver=s, eps_grid=GRID, cache_dir=None), quiet=True)
            for s in ("fast", "exact")}
    tf, te = reps["fast"]["targets"][0], reps["exact"]["targets"][0]
    assert tf["solvers"] == {"lowrank": len(family["factors"])}
    assert tf["counts_vs_eps"] == te["counts_vs_eps"] and tf["total"] > 0
    assert tf["adapter"]["scales"] == [pytest.approx(lora_scale(r, alpha, rslora), rel=1e-6)]
    for m in tf["matrices"]:
        B, A = family["factors"][m["name"]]
        W = ref.lora_weight(family["base_sd"][m["name"]], B, A, alpha, r, rslora)
        assert m["best_cos"] == pytest.approx(ref.best_cosines(family["base_sd"][m["name"]], W).tolist(), abs=1e-4)
        assert m["delta_fro"] == pytest.approx(float((W - family["base_sd"][m["name"]]).norm()), rel=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_intruder_orthogonal_to_the_base_top_subspace(seed):
    """Base 512² Gaussian, W = W0 + s·u·vᵀ with u, v orthogonal to the base's top-10 singular vectors and s = σ5(W0):
    the base's top vectors (the dense path's warm start) are then exact singular vectors of W, with zero residual,
    and the iteration used to stop at once and report no intruder. Counts now equal the full SVD's at every ε,
    for the dense path (which cannot bound the rest of this flat spectrum, and falls back) and the adapter path."""
    g = torch.Generator().manual_seed(seed)
    n = 512
    W0 = torch.randn(n, n, generator=g)
    base = S.full_svd(W0)
    u = torch.randn(n, generator=g)
    u -= base.U[:, :10] @ (base.U[:, :10].T @ u)
    v = torch.randn(n, generator=g)
    v -= base.Vh[:10].T @ (base.Vh[:10] @ v)
    u, v, s = u / u.norm(), v / v.norm(), float(base.S[4])
    W = W0 + s * torch.outer(u, v)
    opts = {m: Options(solver=m, eps_grid=GRID) for m in ("fast", "exact")}
    exact = analyse_matrix("l.0.q.weight", W0.reshape(-1), (n, n), W=W, base_svd=base, opts=opts["exact"])
    dense = analyse_matrix("l.0.q.weight", W0.reshape(-1), (n, n), W=W, base_svd=base, opts=opts["fast"])
    lowrank = analyse_matrix("l.0.q.weight", W0.reshape(-1), (n, n), factors=((s * u)[:, None], v[None, :]),
                             base_svd=base, opts=opts["fast"])
    assert len(exact.intruders(0.5)) == 1
    for r in (dense, lowrank):
        assert [len(r.intruders(e)) for e in GRID] == [len(exact.intruders(e)) for e in GRID], (r.solver, r.best_cos)
    assert "fallback" in dense.solver and lowrank.solver == "lowrank"


def test_fast_path_is_certified_on_trained_like_spectra():
    """A decaying spectrum with a dense fine-tune (noise far above the top gaps in Frobenius norm) and a LoRA update:
    the certificate holds without the full SVD, and the counts are the reference's."""
    g = torch.Generator().manual_seed(4)
    W0, U0, s0, V0 = spectral_matrix(300, 300, g)
    W = W0 + 0.02 * torch.randn(300, 300, generator=g) / math.sqrt(300) + 0.05 * W0 @ torch.diag(torch.linspace(0, 0.1, 300))
    exact, fast = _analyse_dense(W0, W, "exact"), _analyse_dense(W0, W, "fast")
    assert fast.solver == "subspace" and fast.intruders(0.5) == exact.intruders(0.5)
    assert float((W - W0).norm()) > s0[9] - s0[10]  # the cheap Frobenius bound alone could not certify it
    B, A = 0.3 * torch.randn(300, 4, generator=g), torch.randn(4, 300, generator=g) / math.sqrt(300)
    low = analyse_matrix("l.0.q.weight", W0.reshape(-1), (300, 300), factors=(B, A), base_svd=S.full_svd(W0),
                         opts=Options(solver="fast", eps_grid=GRID))
    ref_low = _analyse_dense(W0, W0 + B @ A, "exact")
    assert low.solver == "lowrank" and [len(low.intruders(e)) for e in GRID] == [len(ref_low.intruders(e)) for e in GRID]


def test_eps_and_grid_use_one_rounding():
    """The count at ε and the count under ε's key in the grid are one number, whatever digits ε has."""
    from weightops.spectral.intruders import MatrixResult, summarise

    opts = Options(eps=0.5000004, eps_grid=(0.1, 0.5))
    r = MatrixResult("l.0.q.weight", 0, "q", (4, 4), "exact", 0, 0.0, [1.0, 0.5], [0.5000002, 0.9], [0, 1], {}, 0.0)
    j = r.to_json(opts)
    assert j["count"] == j["counts"][f"{opts.eps:g}"] == 0
    summary = summarise([r], opts)
    assert summary["total"] == summary["counts_vs_eps"][f"{opts.eps:g}"]
    tiny = Options(eps=1.5e-7, eps_grid=(1.5e-7,))
    assert tiny.grid == [1.5e-7]  # not rounded away to 0


def test_error_bound_fallback_reproduces_reference():
    """A cosine sitting on a grid ε (within its error bound) sends the matrix to the full SVD: the reference's numbers."""
    g = torch.Generator().manual_seed(8)
    W0, U0, s0, V0 = spectral_matrix(100, 100, g)
    W = W0 + 2.0 * torch.outer(spread_direction(U0, 10, g), V0[:, 50])
    exact = _analyse_dense(W0, W, "exact")
    plain = _analyse_dense(W0, W, "fast")
    assert plain.solver == "subspace"  # away from every grid ε: no fallback
    on_eps = analyse_matrix("l.0.q.weight", W0.reshape(-1), (100, 100), W=W, base_svd=S.full_svd(W0),
                            opts=Options(solver="fast", eps_grid=(exact.best_cos[0],)))
    assert "fallback" in on_eps.solver
    assert on_eps.best_cos == exact.best_cos and on_eps.sigma == exact.sigma


def test_cache_is_reused_and_survives_corruption(tmp_path, family):
    cache = tmp_path / "cache"
    opts = dict(eps_grid=GRID, cache_dir=str(cache))
    r1 = analyse(str(family["base"]), [str(family["ft"])], opts=Options(**opts), quiet=True)
    assert r1["cache"] == {"dir": str(cache), "hits": 0, "misses": 12}
    r2 = analyse(str(family["base"]), [str(family["lora"])], opts=Options(**opts), quiet=True)
    assert r2["cache"]["hits"] == len(family["factors"]) and r2["cache"]["misses"] == 0
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == 12
    files[0].write_bytes(b"garbage")
    r3 = analyse(str(family["base"]), [str(family["ft"])], opts=Options(**opts), quiet=True)
    assert r3["cache"]["misses"] == 1
    assert [t["counts_vs_eps"] for t in r3["targets"]] == [t["counts_vs_eps"] for t in r1["targets"]]


def test_workers_and_seed_do_not_change_counts(family):
    a = analyse(str(family["base"]), [str(family["ft"]), str(family["lora"])], opts=Options(cache_dir=None), quiet=True)
    b = analyse(str(family["base"]), [str(family["ft"]), str(family["lora"])], opts=Options(cache_dir=None, workers=2, seed=9), quiet=True)
    assert [t["counts_vs_eps"] for t in a["targets"]] == [t["counts_vs_eps"] for t in b["targets"]]
    for ta, tb in zip(a["targets"], b["targets"]):
        assert [m["name"] for m in ta["matrices"]] == [m["name"] for m in tb["matrices"]]
        for ma, mb in zip(ta["matrices"], tb["matrices"]):
            assert ma["best_cos"] == pytest.approx(mb["best_cos"], abs=1e-4)


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (1, 1), (3, 2)])
def test_degenerate_shapes(shape):
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(shape, generator=g)
    W = W0 + torch.randn(shape, generator=g)
    for solver in ("fast", "exact"):
        r = _analyse_dense(W0, W, solver)
        assert len(r.sigma) == min(shape)
        assert r.best_cos == pytest.approx(ref.best_cosines(W0, W).tolist(), abs=1e-5)
    z = _analyse_dense(torch.zeros(shape), torch.zeros(shape))  # W = W0 = 0: no change, no NaN
    assert all(math.isfinite(c) for c in z.best_cos)


def test_empty_and_one_element_matrices_in_a_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = {"layer.0.q_proj.weight": torch.zeros(0, 5), "layer.1.q_proj.weight": torch.tensor([[2.0]]),
            "layer.2.q_proj.weight": torch.randn(70, 66, generator=g)}
    tgt = {"layer.0.q_proj.weight": torch.zeros(0, 5), "layer.1.q_proj.weight": torch.tensor([[-3.0]]),
           "layer.2.q_proj.weight": base["layer.2.q_proj.weight"] + torch.randn(70, 66, generator=g)}
    rep = analyse(str(save_ckpt(tmp_path / "b", base)), [str(save_ckpt(tmp_path / "t", tgt))],
                  opts=Options(cache_dir=None, eps_grid=GRID), quiet=True)
    ms = {m["name"]: m for m in rep["targets"][0]["matrices"]}
    assert set(ms) == {"layer.1.q_proj.weight", "layer.2.q_proj.weight"}  # the empty matrix has nothing to analyse
    assert ms["layer.1.q_proj.weight"]["best_cos"] == [1.0]  # a 1×1 matrix's only direction is the base's
    want = ref.best_cosines(base["layer.2.q_proj.weight"], tgt["layer.2.q_proj.weight"])
    assert ms["layer.2.q_proj.weight"]["counts"] == {f"{e:g}": int((want < e).sum()) for e in GRID}


def test_lowrank_tall_matrix_with_directions_outside_the_base_span():
    """Tall W0 (m > n): B has components outside span(U0); they have cosine 0 with every base vector."""
    g = torch.Generator().manual_seed(11)
    W0, U0, s0, V0 = spectral_matrix(160, 70, g)
    B, A = 2.0 * torch.randn(160, 3, generator=g), torch.randn(3, 70, generator=g) / math.sqrt(70)
    top = S.topk_lowrank(S.full_svd(W0), B, A, 10)
    want = ref.best_cosines(W0, W0 + B @ A)
    assert top.cos.max(0).values.tolist() == pytest.approx(want.tolist(), abs=1e-4)
    U, V = top.vectors()
    W = W0 + B @ A
    assert (W @ V - U * top.S).norm() / top.S[0] < 1e-5


def test_bad_input(tmp_path, family):
    with pytest.raises(WeightopsError, match="no 2-D weight"):
        analyse(str(family["base"]), [str(family["ft"])], opts=Options(modules="nothing_matches"), quiet=True)
    with pytest.raises(WeightopsError, match="--top-k"):
        analyse(str(family["base"]), [str(family["ft"])], opts=Options(top_k=0), quiet=True)
    with pytest.raises(WeightopsError, match="ε values"):
        analyse(str(family["base"]), [str(family["ft"])], opts=Options(eps=1.5), quiet=True)
    other = save_ckpt(tmp_path / "other", bert_like(1, 16, 24, seed=0))
    with pytest.raises(WeightopsError, match="has no tensor|is \\["):
        analyse(str(family["base"]), [str(other)], opts=Options(cache_dir=None), quiet=True)
    with pytest.raises(WeightopsError, match="--labels"):
        analyse(str(family["base"]), [str(family["ft"])], labels=["a", "b"], quiet=True)
