"""Native kernels (weightops._C) against the reference, bit for bit.

Skipped only when the extension is not built; set WEIGHTOPS_REQUIRE_NATIVE=1
(as CI should, after building) to make a missing extension a failure.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import weightops.ops as ops
from weightops.ops import _ext

if not _ext.load():
    if os.environ.get("WEIGHTOPS_REQUIRE_NATIVE") == "1":
        raise RuntimeError(f"native extension required but unavailable: {_ext.status()['reason']}")
    pytest.skip(f"native extension unavailable: {_ext.status()['reason']}", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.bool: torch.bool,
        torch.int64: torch.int64}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def both(fn, *args, **kw):
    ops.use_kernels("reference")
    try:
        r = fn(*args, **kw)
    finally:
        ops.use_kernels("native")
    return fn(*args, **kw), r


def assert_same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.is_floating_point():
        # NaN payloads are the one thing allowed to differ: torch itself is not
        # consistent about them between its vectorised and scalar casts.
        na, nb = torch.isnan(a), torch.isnan(b)
        assert torch.equal(na, nb)
        a, b = a.masked_fill(na, 0), b.masked_fill(nb, 0)
    assert torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))  # -0.0 != +0.0 here


@pytest.fixture(autouse=True)
def _native_mode():
    ops.use_kernels("native")
    assert ops.kernels_in_use() == "native"
    yield
    ops.use_kernels("auto")


def _inputs(n, base_dtype, model_dtypes, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    models = [(base + torch.randn(n, generator=g) * 0.02).to(dt) for dt in model_dtypes]
    if n > 8:
        models[0][:4] = base[:4].to(models[0].dtype)  # zero deltas
    return base.to(base_dtype).to(device), [m.to(device) for m in models]


SIZES = [0, 1, 3, 4, 5, 2047, 2048, 2049, 70001]
OFFSETS = [0, 1, 2, 3, 2**34 + 1]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("consensus", ["sum", "ties"])
def test_delta_merge_sizes_offsets(n, offset, consensus):
    base, models = _inputs(n, torch.bfloat16, [torch.bfloat16, torch.float32, torch.float16], seed=n + offset)
    kw = dict(offset=offset, keys=[ops.model_key(9, i, "w") for i in range(3)], drop_threshold=ops.drop_threshold(0.6),
              rescales=[2.5, 2.5, 1.0], consensus=consensus, lam=0.7)
    assert_same_bits(*both(ops.delta_merge, base, models, [0.5, -0.25, 1.0], **kw))


@pytest.mark.parametrize("base_dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("variant", ["task_arithmetic", "dare", "ties", "dare_ties", "trim", "breadcrumbs"])
def test_delta_merge_dtypes_and_variants(base_dtype, model_dtype, out_dtype, variant):
    base, models = _inputs(5003, base_dtype, [model_dtype] * 3, seed=1)
    keys = [ops.model_key(0, i, "t") for i in range(3)]
    kw = {
        "task_arithmetic": dict(),
        "dare": dict(keys=keys, drop_threshold=ops.drop_threshold(0.9), rescales=[10.0] * 3),
        "ties": dict(consensus="ties", lo=[0.01, 0.02, 0.0]),
        "dare_ties": dict(keys=keys, drop_threshold=ops.drop_threshold(0.5), rescales=[2.0] * 3, consensus="ties"),
        "trim": dict(lo=[0.005, 0.01, 0.015]),
        "breadcrumbs": dict(lo=[0.001] * 3, hi=[0.03, math.inf, 0.04]),
    }[variant]
    got, want = both(ops.delta_merge, base, models, [0.3, 0.3, 0.4], out_dtype=out_dtype, lam=1.3, **kw)
    assert got.dtype == out_dtype
    assert_same_bits(got, want)


def test_delta_merge_nonfinite_and_zero_models():
    base = torch.tensor([0.0, 1.0, -1.0, float("inf"), 3.0, float("nan"), 1e38, -0.0, 5.0])
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), float("inf"), 1e-45, 0.0, -1e38, 0.0, 3e38])
    for consensus in ("sum", "ties"):
        kw = dict(consensus=consensus, lo=[0.5, 0.0], hi=[math.inf, 1e30])
        assert_same_bits(*both(ops.delta_merge, base, [x, x.flip(0)], [1.0, 0.5], **kw))
        one = dict(consensus=consensus, lo=[0.5], hi=[1e30])
        assert_same_bits(*both(ops.delta_merge, base.bfloat16(), [x.half()], [2.0], out_dtype=torch.float16, **one))
        assert_same_bits(*both(ops.delta_merge, base, [], [], consensus=consensus, lam=3.0))


def test_delta_merge_thread_count_invariant():
    base, models = _inputs(300_000, torch.bfloat16, [torch.bfloat16] * 2, seed=5)
    kw = dict(keys=[(1, 2), (3, 4)], drop_threshold=ops.drop_threshold(0.3), consensus="ties", offset=17)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.delta_merge(base, models, [0.6, 0.4], **kw)
        torch.set_num_threads(2)
        two = ops.delta_merge(base, models, [0.6, 0.4], **kw)
        h1 = ops.abs_histogram(models[0], base)
        torch.set_num_threads(1)
        h2 = ops.abs_histogram(models[0], base)
    finally:
        torch.set_num_threads(old)
    assert_same_bits(one, two)
    assert torch.equal(h1, h2)


@pytest.mark.parametrize("n", SIZES)
def test_weighted_sum(n):
    _, xs = _inputs(n, torch.float32, DTYPES, seed=2)
    for out_dtype in (None, torch.float16, torch.bfloat16):
        assert_same_bits(*both(ops.weighted_sum, xs, [0.2, -1.5, 0.7], out_dtype=out_dtype))
    assert_same_bits(*both(ops.weighted_sum, xs[1:2], [1.0]))


@pytest.mark.parametrize("n", [0, 1, 5, 2049, 70001])
@pytest.mark.parametrize("x_dtype,base_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32),
                                                (torch.float16, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_abs_histogram(n, x_dtype, base_dtype):
    base, (x,) = _inputs(n, base_dtype or torch.float32, [x_dtype], seed=3)
    base = None if base_dtype is None else base
    coarse, ref = both(ops.abs_histogram, x, base)
    assert torch.equal(coarse, ref) and int(coarse.sum()) == n
    if n:
        p = int(coarse.argmax())
        assert torch.equal(*both(ops.abs_histogram, x, base, p))
        assert torch.equal(*both(ops.abs_histogram, x, base, 0))


def test_kth_largest_abs_native_matches_kthvalue():
    g = torch.Generator().manual_seed(4)
    blocks = [(torch.randn(n, generator=g).bfloat16(), torch.randn(n, generator=g)) for n in (100_000, 1, 33_333)]
    blocks.append((torch.zeros(10), torch.zeros(10)))
    allv = torch.cat([(x.float() - b).abs() for x, b in blocks])
    n = allv.numel()
    ks = [1, 2, 1000, n // 2, n - 10, n]
    got = ops.kth_largest_abs(lambda: iter(blocks), ks)
    assert got == [torch.kthvalue(allv, n - k + 1).values.item() for k in ks]


@pytest.mark.parametrize("offset", [0, 3, 2**34 - 2])
def test_philox_keep_mask(offset):
    # 1, 5, 63: the scalar rule of weightops/philox.h (the one the CUDA kernels run); 4099: tiles + a 3-element tail
    for n in (1, 5, 63, 64, 4099):
        for thr in (0, 1, ops.drop_threshold(0.37), 1 << 24):
            assert torch.equal(*both(ops.philox_keep_mask, (0xDEADBEEF, 7), offset, n, thr))


def test_opcheck():
    base, models = _inputs(301, torch.bfloat16, [torch.float32, torch.float16], seed=6)
    W = torch.ops.weightops
    cases = [
        (W.delta_merge, (base, models, [0.5, 0.5], 3, [1, 2, 3, 4], 1000, [2.0, 2.0], None, None, "ties", 1.0,
                         torch.bfloat16)),
        (W.delta_merge, (base, models, [0.5, 0.5], 0, [], 0, [1.0, 1.0], [0.01, 0.0], [0.5, math.inf], "sum", 0.5,
                         torch.float32)),
        (W.weighted_sum, (models, [0.25, 0.75], torch.float16)),
        (W.abs_histogram, (models[0], base, -1)),
        (W.abs_histogram, (models[1], None, 0x3C00)),
        (W.philox_keep_mask_out, (torch.empty(77, dtype=torch.bool), 5, 6, 9, 123456)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_disable_ext_env_falls_back_to_reference():
    code = ("import weightops.ops as o, weightops.errors as e\n"
            "assert o.kernels_in_use() == 'reference'\n"
            "try:\n    o.use_kernels('native')\nexcept e.WeightopsError as err:\n    print('refused:', err)\n")
    env = dict(os.environ, WEIGHTOPS_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "refused:" in out and "WEIGHTOPS_DISABLE_EXT" in out


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("consensus", ["sum", "ties"])
def test_cuda_matches_cpu_reference(consensus):
    assert ops.has_kernel("delta_merge", "cuda")
    base, models = _inputs(100_003, torch.bfloat16, [torch.bfloat16, torch.float32, torch.float16], seed=7)
    kw = dict(offset=5, keys=[(1, 2), (3, 4), (5, 6)], drop_threshold=ops.drop_threshold(0.5), rescales=[2.0] * 3,
              lo=[0.001] * 3, hi=[math.inf, 0.05, 0.04], consensus=consensus)
    ops.use_kernels("reference")
    want = ops.delta_merge(base, models, [0.2, 0.3, 0.5], **kw)
    ops.use_kernels("native")
    got = ops.delta_merge(base.cuda(), [m.cuda() for m in models], [0.2, 0.3, 0.5], **kw).cpu()
    assert_same_bits(got, want)
    assert torch.equal(ops.abs_histogram(models[1].cuda(), base.cuda()).cpu(),
                       ops.abs_histogram(models[1], base))
    assert_same_bits(ops.weighted_sum([m.cuda() for m in models], [0.1, 0.2, 0.7]).cpu(),
                     ops.weighted_sum(models, [0.1, 0.2, 0.7]))
    assert torch.equal(ops.philox_keep_mask((9, 9), 3, 1001, 77777, "cuda").cpu(),
                       ops.philox_keep_mask((9, 9), 3, 1001, 77777))


@pytest.fixture(params=["baseline", "avx2", "avx512"])
def cpu_isa(request):
    """Each CPU tile table in turn (skipped where the CPU lacks it); the previous one restored after."""
    W = torch.ops.weightops
    isa, previous = request.param, W._cpu_isa("")
    try:
        W._cpu_isa(isa)
    except RuntimeError as e:
        pytest.skip(f"{isa} not available on this CPU: {e}")
    try:
        yield isa
    finally:
        W._cpu_isa(previous)


def test_every_cpu_isa_matches_reference(cpu_isa):
    assert torch.ops.weightops._cpu_isa("") == cpu_isa
    base, models = _inputs(20_011, torch.float16, [torch.bfloat16, torch.float16, torch.float32], seed=8)
    keys = [(11, 12), (13, 14), (2**32 - 1, 0)]
    for consensus in ("sum", "ties"):
        kw = dict(offset=2**34 - 37, keys=keys, drop_threshold=ops.drop_threshold(0.5), rescales=[2.0] * 3,
                  lo=[0.0, 0.001, 0.002], hi=[0.05, math.inf, 0.04], consensus=consensus)
        for out_dtype in DTYPES:
            assert_same_bits(*both(ops.delta_merge, base, models, [0.2, 0.3, 0.5], out_dtype=out_dtype, **kw))
    assert_same_bits(*both(ops.weighted_sum, models, [0.2, 0.3, 0.5], out_dtype=torch.float16))
    assert torch.equal(*both(ops.abs_histogram, models[0], base))
    assert torch.equal(*both(ops.philox_keep_mask, (5, 6), 2**34 - 5, 9999, 1 << 23))
    # Every fp16 bit pattern widened, and fp32 values across the fp16/bf16 ranges narrowed.
    all_halves = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    assert_same_bits(*both(ops.weighted_sum, [all_halves], [1.0], out_dtype=torch.float32))
    g = torch.Generator().manual_seed(9)
    wide = torch.randn(200_000, generator=g) * torch.logspace(-45, 38, 200_000).float()
    for out_dtype in (torch.float16, torch.bfloat16):
        assert_same_bits(*both(ops.weighted_sum, [wide], [1.0], out_dtype=out_dtype))


def test_every_cpu_isa_fused_sum_matches_reference(cpu_isa):
    """The one-pass "sum" consensus (inputs and output in one dtype, no magnitude cuts, 1-4 models) of each
    ISA, with and without drops, across tile edges and offsets, with non-finite values and zero deltas."""
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, 3e38, -3e38])
    for dt in DTYPES:
        for k in (1, 2, 3, 4, 5):
            base, models = _inputs(6151, dt, [dt] * k, seed=10 + k)
            for i, x in enumerate(models):
                x[100 + 16 * i:108 + 16 * i] = special.to(dt)
            base[300:308] = special.to(dt)
            weights, keys = [0.7, -0.2, 0.4, 0.1, 0.3][:k], [ops.model_key(4, i, "f") for i in range(k)]
            for offset in (0, 2**34 - 37):
                assert_same_bits(*both(ops.delta_merge, base, models, weights, offset=offset, lam=1.3))
                for p in (0.5, 0.9):
                    kw = dict(offset=offset, keys=keys, drop_threshold=ops.drop_threshold(p), rescales=[1 / (1 - p)] * k)
                    assert_same_bits(*both(ops.delta_merge, base, models, weights, lam=0.8, **kw))
