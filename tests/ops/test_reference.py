"""The reference kernels against independent re-derivations of the spec
(pure-Python Philox, numpy float32 scalar loops, torch.kthvalue)."""
import math

import numpy as np
import pytest
import torch

import weightops.ops as ops
from weightops.ops import reference as ref

from _pyphilox import draw_byte
from _pyphilox import keep as py_keep
from _pyphilox import philox as py_philox

# Random123 kat_vectors, philox4x32 10 rounds: (ctr, key, expected output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.fixture(autouse=True)
def _reference_mode():
    ops.use_kernels("reference")
    yield
    ops.use_kernels("auto")


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    assert py_philox(ctr, key) == expected
    words = ref.philox4x32_10(*[torch.tensor([c], dtype=torch.int64) for c in ctr], *key)
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("offset", [0, 1, 3, 1001, 2**32 * 4 - 3, 2**34 + 5, 2**41 + 2])
def test_keep_mask_matches_python_philox(offset):
    key, thr, n = (0x12345678, 0x9ABCDEF0), ops.drop_threshold(0.5), 37
    mask = ops.philox_keep_mask(key, offset, n, thr)
    assert mask.tolist() == [py_keep(key, offset + i, thr) for i in range(n)]


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_keep_mask_settles_byte_ties_with_the_second_draw(p):
    """About 1 element in 256 has its byte equal to the threshold's high byte: those take the second draw."""
    key, thr, offset, n = (0x0BADF00D, 0x12345), ops.drop_threshold(p), 2**33 + 7, 3000
    ties = [i for i in range(n) if draw_byte(key, offset + i) == thr >> 16]
    assert len(ties) >= 3  # the case is exercised
    mask = ops.philox_keep_mask(key, offset, n, thr)
    assert mask.tolist() == [py_keep(key, offset + i, thr) for i in range(n)]
    assert len({bool(mask[i]) for i in ties}) == 2 or p == 0.5  # ties go both ways (0.5: thr's low bits are 0)


def test_keep_mask_is_independent_of_blocking():
    key, thr = ops.model_key(7, 1, "layer.weight"), ops.drop_threshold(0.9)
    whole = ops.philox_keep_mask(key, 0, 1000, thr)
    cuts = [0, 1, 5, 6, 333, 334, 999, 1000]
    parts = [ops.philox_keep_mask(key, a, b - a, thr) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(parts), whole)


def test_keep_probability_and_extremes():
    key = ops.model_key(0, 0, "w")
    frac = ops.philox_keep_mask(key, 0, 1 << 20, ops.drop_threshold(0.3)).float().mean().item()
    assert abs(frac - 0.7) < 0.003  # ~6.5 sigma for 1M Bernoulli draws
    assert ops.philox_keep_mask(key, 0, 1000, 0).all()
    assert not ops.philox_keep_mask(key, 0, 1000, 1 << 24).any()
    assert ops.philox_keep_mask(key, 0, 0, 5).shape == (0,)


def test_drop_threshold_and_model_key():
    assert ops.drop_threshold(0.0) == 0 and ops.drop_threshold(1.0) == 1 << 24
    assert ops.drop_threshold(-1) == 0 and ops.drop_threshold(2) == 1 << 24
    assert ops.drop_threshold(0.5) == 1 << 23
    k = ops.model_key(42, 1, "a.b")
    assert k == ops.model_key(42, 1, "a.b") and k != ops.model_key(42, 2, "a.b") != ops.model_key(43, 1, "a.b")
    assert all(0 <= w < 2**32 for w in k)


def _np_delta_merge(base, models, weights, offset, keys, thr, rescales, lo, hi, consensus, lam):
    """One element at a time in numpy float32 scalars: every op rounds to fp32."""
    f = np.float32
    out = []
    for j, bv in enumerate(base.float().tolist()):
        b = f(bv)
        ds = []
        for i, x in enumerate(models):
            d = f(x[j].float().item()) - b
            a = abs(d)
            keep = True
            if lo is not None:
                keep = keep and not (a < f(lo[i]))
            if hi is not None:
                keep = keep and (math.isinf(hi[i]) or a < f(hi[i]))
            if thr:
                keep = keep and py_keep(keys[i], offset + j, thr)
            ds.append(d * f(rescales[i]) if keep else f(0))
        if consensus == "sum":
            m = f(0)
            for w, d in zip(weights, ds):
                m = m + f(w) * d
        else:
            s = f(0)
            for w, d in zip(weights, ds):
                s = s + f(w) * d
            num, den = f(0), f(0)
            for w, d in zip(weights, ds):
                if (d > 0) if s >= 0 else (d < 0):
                    num, den = num + f(w) * d, den + f(w)
            m = num / den if den != 0 else f(0)
        out.append(b + f(lam) * m)
    return torch.tensor(np.array(out, dtype=np.float32))


@pytest.mark.parametrize("consensus", ["sum", "ties"])
@pytest.mark.parametrize("drop", [0.0, 0.4])
@pytest.mark.parametrize("trim", [False, True])
def test_delta_merge_matches_scalar_spec(consensus, drop, trim):
    g = torch.Generator().manual_seed(3)
    n, offset = 61, 2**33 + 7
    base = torch.randn(n, generator=g)
    models = [base + torch.randn(n, generator=g) * 0.1 for _ in range(3)]
    models[1] = models[1].bfloat16()
    models[2][:5] = base[:5]  # zero deltas: sign ties
    weights, rescales = [0.3, 0.5, 0.7], [1.5, 1.0, 2.0]
    keys = [ops.model_key(1, i, "t") for i in range(3)]
    lo = [0.02, 0.0, 0.05] if trim else None
    hi = [0.15, math.inf, 0.2] if trim else None
    thr = ops.drop_threshold(drop)
    got = ops.delta_merge(base, models, weights, offset=offset, keys=keys, drop_threshold=thr, rescales=rescales,
                          lo=lo, hi=hi, consensus=consensus, lam=0.9, out_dtype=torch.float32)
    want = _np_delta_merge(base, models, ops._f32(weights), offset, keys, thr, rescales, lo, hi, consensus,
                           ops._f32([0.9])[0])
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_delta_merge_edge_sizes_and_dtypes():
    for n in (0, 1):
        b = torch.randn(n, dtype=torch.bfloat16)
        out = ops.delta_merge(b, [b.half()], [1.0], keys=[(1, 2)], drop_threshold=5, consensus="ties")
        assert out.dtype == torch.bfloat16 and out.shape == (n,)
    b = torch.randn(4, 5)
    assert torch.equal(ops.delta_merge(b, [], [], lam=2.0), b)  # no models: base unchanged
    with pytest.raises(ValueError):
        ops.delta_merge(b, [b], [1.0], drop_threshold=3)  # keys missing


def test_delta_merge_is_independent_of_blocking():
    n = 1000
    base = torch.randn(n)
    models = [torch.randn(n).half() for _ in range(2)]
    kw = dict(keys=[(5, 6), (7, 8)], drop_threshold=ops.drop_threshold(0.7), rescales=[3.3, 3.3], consensus="ties")
    whole = ops.delta_merge(base, models, [1.0, 0.5], **kw)
    cuts = [0, 3, 4, 517, 1000]
    parts = [ops.delta_merge(base[a:b], [m[a:b] for m in models], [1.0, 0.5], offset=a, **kw)
             for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(parts), whole)


def test_weighted_sum_matches_scalar_spec():
    xs = [torch.randn(33), torch.randn(33).bfloat16(), torch.randn(33).half()]
    w = ops._f32([0.1, 0.7, -0.3])
    f = np.float32
    want = []
    for j in range(33):
        acc = f(0)
        for wi, x in zip(w, xs):
            acc = acc + f(wi) * f(x[j].float().item())
        want.append(acc)
    got = ops.weighted_sum(xs, [0.1, 0.7, -0.3])
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.tensor(np.array(want, dtype=np.float32)))
    assert ops.weighted_sum(xs[1:], [1.0, 1.0]).dtype == torch.bfloat16


def test_abs_histogram_matches_numpy():
    x, b = torch.randn(5000), torch.randn(5000).bfloat16()
    u = np.abs(x.numpy() - b.float().numpy()).view(np.uint32)
    coarse = ops.abs_histogram(x, b)
    assert coarse.dtype == torch.int64 and coarse.shape == (65536,)
    assert coarse.tolist() == np.bincount(u >> 16, minlength=65536).tolist()
    p = int(np.bincount(u >> 16).argmax())
    fine = ops.abs_histogram(x, b, p)
    assert fine.tolist() == np.bincount(u[(u >> 16) == p] & 0xFFFF, minlength=65536).tolist()
    assert int(ops.abs_histogram(torch.tensor([-0.0, 0.0])).sum()) == 2


def _kth_cases():
    g = torch.Generator().manual_seed(0)
    yield "randn", [torch.randn(1000, generator=g), torch.randn(777, generator=g)], None
    yield "ties", [torch.randint(-3, 4, (500,), generator=g).float()], None
    yield "all_equal", [torch.full((100,), -2.5)], None
    yield "zeros", [torch.zeros(50), torch.zeros(0)], None
    sub = torch.tensor([1e-45, 3e-45, 1e-40, -1e-39, 0.0, 1e-38])
    yield "subnormals", [sub, sub * 2], None
    yield "bf16_delta", [torch.randn(900, generator=g).bfloat16()], [torch.randn(900, generator=g).bfloat16()]


@pytest.mark.parametrize("case", list(_kth_cases()), ids=lambda c: c[0])
def test_kth_largest_abs_equals_kthvalue(case):
    _, xs, bases = case
    bases = bases or [None] * len(xs)
    allv = torch.cat([(x.float() - (b.float() if b is not None else 0)).abs() for x, b in zip(xs, bases)])
    n = allv.numel()
    ks = sorted({1, 2, n // 3, n // 2, n - 1, n}) if n else []
    ks = [k for k in ks if k >= 1]
    calls = []

    def stream():
        calls.append(1)
        return zip(xs, bases)

    got = ops.kth_largest_abs(stream, ks + [0, -1, n + 1])
    want = [torch.kthvalue(allv, n - k + 1).values.item() for k in ks]
    assert got[:len(ks)] == want
    assert got[len(ks):] == [math.inf, math.inf, 0.0]
    assert len(calls) <= 2


def test_kernel_mode_switches(monkeypatch):
    from weightops.errors import WeightopsError

    with pytest.raises(WeightopsError):
        ops.use_kernels("fast")
    ops.use_kernels("reference")
    assert ops.kernels_in_use() == "reference"
    monkeypatch.setattr(ops, "_mode", None)
    monkeypatch.setenv("WEIGHTOPS_KERNELS", "reference")
    assert ops.kernels_in_use() == "reference"
