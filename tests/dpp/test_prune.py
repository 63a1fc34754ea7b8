"""Every pruning rule through the streaming engine equals its whole-tensor reference, bit for bit,
for fp32/bf16/fp16, odd shapes, empty and 1-element tensors and block sizes that do not divide them;
the sparse delta restores the pruned model exactly."""
from __future__ import annotations

import pytest
import torch

from _fixtures import odd_pairs  # noqa: F401  (fixture)
from weightops.dpp import reference as R
from weightops.dpp.api import apply_delta, prune
from weightops.engine import merge
from weightops.io.checkpoint import Checkpoint

NORMS = {"w.a": torch.rand(29, generator=torch.Generator().manual_seed(5)) + 0.1}
CASES = {
    "dare": dict(method="dare"),
    "darex-q": dict(method="darex-q", q=0.55),
    "magnitude": dict(method="magnitude"),
    "magnitude-global": dict(method="magnitude", scope="global"),
    "magnitude-row": dict(method="magnitude", scope="row"),
    "wanda-row": dict(method="wanda", scope="row"),
    "wanda-tensor": dict(method="wanda", scope="tensor"),
    "della": dict(method="della", epsilon=0.1),
    "keep": dict(method="dare", keep=r"w\.b"),
}


def _ref_kwargs(kw):
    return {"q": kw.get("q"), "scope": kw.get("scope") or {"magnitude": "tensor", "wanda": "row"}.get(kw["method"]),
            "epsilon": kw.get("epsilon", 0.0), "keep": kw.get("keep"), "norms": NORMS if kw["method"] == "wanda" else None}


def _run(tmp_path, b, f, kw, fmt, block):
    from weightops.dpp import api

    kw = dict(kw)
    if kw["method"] == "wanda":  # calibration comes from a transformers model; here the norms are given directly
        api_prune = _prune_with_norms
    else:
        api_prune = prune
    return api_prune(b, f, out=tmp_path / f"{fmt}-{block}", rate=0.6, seed=4, block_size=block, quiet=True,
                     format=fmt, **kw)


def _prune_with_norms(b, f, *, out, rate, seed, block_size, quiet, format, method, scope=None):
    """prune() with WANDA norms injected (the calibration path is tested in test_calibration.py)."""
    from weightops.dpp import api
    from weightops.dpp.rules import PruneParams

    params = PruneParams(rate=rate, seed=seed, scope=scope, norms=NORMS)
    writer = api._write_model if format == "model" else api._write_delta
    extra = dict(dtype=None, shard_size="5GB") if format == "model" else {}
    return writer(b, f, params, method, {}, out=out, block_size=block_size, kernels="auto", exclude=None, force=False,
                  quiet=quiet, command=None, **extra)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", list(CASES))
def test_streaming_equals_reference(tmp_path, odd_pairs, dtype, case):  # noqa: F811
    b, f, bsd, fsd = odd_pairs[dtype]
    kw = CASES[case]
    want = R.prune(bsd, fsd, kw["method"], 0.6, seed=4, **_ref_kwargs(kw))
    for block in (50, 1000):
        _run(tmp_path, b, f, kw, "model", block)
        got = Checkpoint(tmp_path / f"model-{block}").load()
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
            assert torch.equal(got[k], want[k]), (case, dtype, block, k)
    # something was actually pruned, and something kept
    d = {k: (want[k].float() - bsd[k].float()) for k in ("w.a", "w.vec")}
    assert all(0 < int((v != 0).sum()) < v.numel() for v in d.values())


@pytest.mark.parametrize("case", ["dare", "magnitude-global", "wanda-row", "della"])
def test_sparse_delta_round_trip_is_exact(tmp_path, odd_pairs, case):  # noqa: F811
    b, f, bsd, fsd = odd_pairs["bfloat16"]
    kw = CASES[case]
    full = _run(tmp_path, b, f, kw, "model", 11)
    delta = _run(tmp_path, b, f, kw, "delta", 13)
    assert delta.kept == full.kept and 0 < delta.kept < delta.total
    apply_delta(b, delta.out, out=tmp_path / "restored", quiet=True)
    want, got = Checkpoint(full.out).load(), Checkpoint(tmp_path / "restored").load()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_sparse_delta_is_smaller(tmp_path, tiny_models):
    full = prune(tiny_models["base"], tiny_models["ft0"], out=tmp_path / "m", method="dare", rate=0.9, quiet=True)
    delta = prune(tiny_models["base"], tiny_models["ft0"], out=tmp_path / "d", method="dare", rate=0.9, quiet=True,
                  format="delta")
    assert delta.bytes_written < 0.5 * full.bytes_written
    assert abs(delta.kept / delta.total - 0.1) < 0.02


def test_prune_dare_equals_merge_dare_linear(tmp_path, tiny_models):
    prune(tiny_models["base"], tiny_models["ft1"], out=tmp_path / "p", method="dare", rate=0.8, seed=9, quiet=True)
    merge([tiny_models["ft1"]], base=tiny_models["base"], method="dare_linear", drop_rate=0.8, seed=9,
          out=tmp_path / "m", quiet=True)
    a, b = Checkpoint(tmp_path / "p").load(), Checkpoint(tmp_path / "m").load()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_manifest_logs_choices(tmp_path, tiny_models):
    import json

    prune(tiny_models["base"], tiny_models["ft0"], out=tmp_path / "p", method="darex-q", rate=0.9, q=0.4, quiet=True)
    m = json.loads((tmp_path / "p" / "weightops.json").read_text())
    assert m["dpp"]["method"] == "darex-q" and m["dpp"]["q"] == {"by": "given", "value": 0.4}
    assert m["params"]["q"] == 0.4 and 0 < m["dpp"]["kept"] < m["dpp"]["total"]


def test_public_prune_is_the_function_after_any_import():
    """`from weightops.dpp import prune` must not give a submodule of the same name."""
    import weightops.dpp.api  # noqa: F401  (imports every dpp submodule)
    from weightops.dpp import prune

    assert callable(prune) and prune.__module__ == "weightops.dpp.api"
