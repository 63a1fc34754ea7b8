"""Each method through the streaming engine equals its whole-tensor reference."""
from __future__ import annotations

import pytest
import torch

from checkpoints import make_bert_state, write_model
from weightops.engine import merge
from weightops.io.checkpoint import Checkpoint
from weightops.methods import reference as R

CASES = {
    "linear": (dict(), lambda b, ms: R.linear(ms)),
    "linear-weighted": (dict(method="linear", weights=[0.2, 0.3, 0.5]), lambda b, ms: R.linear(ms, [0.2, 0.3, 0.5])),
    "task_arithmetic": (dict(lam=0.7, weights=[1.0, -0.5, 0.25]),
                        lambda b, ms: R.task_vector_merge(b, ms, lam=0.7, weights=[1.0, -0.5, 0.25])),
    "ties": (dict(density=0.3), lambda b, ms: R.task_vector_merge(b, ms, consensus="ties", density=0.3, trim_scope="global")),
    "ties-tensor": (dict(method="ties", density=0.3, trim_scope="tensor"),
                    lambda b, ms: R.task_vector_merge(b, ms, consensus="ties", density=0.3, trim_scope="tensor")),
    "dare_linear": (dict(drop_rate=0.7, seed=3), lambda b, ms: R.task_vector_merge(b, ms, drop_rate=0.7, seed=3)),
    "dare_ties": (dict(drop_rate=0.5, density=0.5, lam=0.9),
                  lambda b, ms: R.task_vector_merge(b, ms, consensus="ties", drop_rate=0.5, density=0.5, lam=0.9)),
    "dare-darexq": (dict(method="dare", drop_rate=0.9, rescale="darex-q", q=0.3),
                    lambda b, ms: R.task_vector_merge(b, ms, drop_rate=0.9, rescale="darex-q", q=0.3)),
    "breadcrumbs": (dict(density=0.8, gamma=0.05),
                    lambda b, ms: R.task_vector_merge(b, ms, density=0.8, gamma=0.05)),
    "model_stock": (dict(), lambda b, ms: R.model_stock(b, ms)),
}


def _method(case: str, kw: dict) -> str:
    return kw.pop("method", case.split("-")[0])


@pytest.mark.parametrize("case", list(CASES))
def test_method_matches_reference(case, tiny_models, tmp_path):
    kw, ref = dict(CASES[case][0]), CASES[case][1]
    method = _method(case, kw)
    ms = [tiny_models[f"ft{i}"] for i in range(3)]
    out = merge(ms, base=tiny_models["base"], method=method, out=tmp_path / "m", quiet=True, block_size=1000, **kw).out
    got = Checkpoint(out).load()
    want = ref(tiny_models["base_sd"], [tiny_models[f"ft{i}_sd"] for i in range(3)])
    for k, v in want.items():
        g = got[k].reshape(v.shape)
        if v.is_floating_point():
            torch.testing.assert_close(g.float(), v.float(), rtol=1e-5, atol=1e-6, msg=f"{case}: {k}")
        else:
            assert torch.equal(g, v)


def test_slerp_matches_reference(tiny_models, tmp_path):
    out = merge([tiny_models["ft0"], tiny_models["ft1"]], method="slerp", t=0.3, out=tmp_path / "s", quiet=True).out
    got = Checkpoint(out).load()
    want = R.slerp(tiny_models["ft0_sd"], tiny_models["ft1_sd"], 0.3)
    for k, v in want.items():
        torch.testing.assert_close(got[k].reshape(v.shape).to(v.dtype), v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "linear"])
def test_half_precision_inputs(dtype, method, tmp_path):
    base = make_bert_state(0, dtype=dtype)
    fts = [make_bert_state(7 + i, base=base) for i in range(2)]
    b = write_model(tmp_path / "b", base)
    ms = [write_model(tmp_path / f"f{i}", sd, shards=1 + i) for i, sd in enumerate(fts)]
    res = merge(ms, base=b, method=method, out=tmp_path / "o", quiet=True, block_size=333)
    got = Checkpoint(res.out).load()
    if method == "linear":
        want = R.linear(fts)
    else:
        kw = {"ties": dict(consensus="ties", density=0.2, trim_scope="global"),
              "dare_linear": dict(drop_rate=0.9)}.get(method, {})
        want = R.task_vector_merge(base, fts, **kw)
    for k, v in want.items():
        assert got[k].dtype == base[k].dtype  # output dtype defaults to the base's
        if v.is_floating_point():
            assert torch.equal(got[k].reshape(v.shape), v.to(dtype)), k


def test_output_dtype_flag(tiny_models, tmp_path):
    res = merge([tiny_models["ft0"], tiny_models["ft1"]], method="linear", dtype="bfloat16", out=tmp_path / "o", quiet=True)
    got = Checkpoint(res.out)
    for name, info in got.infos.items():
        assert info.dtype == (torch.bfloat16 if tiny_models["base_sd"][name].is_floating_point() else torch.int64)
