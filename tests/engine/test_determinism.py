"""DARE masks are a pure function of (seed, model, tensor, element): block size,
tensor order, sharding, thread count and kernels never change the output bytes."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from weightops import ops
from weightops.engine import merge
from weightops.io.checkpoint import Checkpoint
from weightops.methods import reference as R


def _odd_models(root, dtype=torch.float32):
    """Tensors of awkward sizes, including empty and single-element ones."""
    g = torch.Generator().manual_seed(1)
    shapes = {"w": (13, 7), "v": (61,), "one": (1,), "empty": (0, 3), "big": (37, 29)}
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    fts = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()} for _ in range(2)]
    paths = []
    for name, sd in [("base", base), ("a", fts[0]), ("b", fts[1])]:
        (root / name).mkdir()
        save_file(sd, str(root / name / "model.safetensors"))
        paths.append(root / name)
    # the same fine-tune again, split over two shards in another order
    (root / "b2").mkdir()
    keys = list(fts[1])[::-1]
    save_file({k: fts[1][k] for k in keys[:2]}, str(root / "b2" / "model-00001-of-00002.safetensors"))
    save_file({k: fts[1][k] for k in keys[2:]}, str(root / "b2" / "model-00002-of-00002.safetensors"))
    import json
    (root / "b2" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00002.safetensors" if k in keys[:2] else "model-00002-of-00002.safetensors" for k in keys}}))
    return base, fts, paths, root / "b2"


def _bytes(out) -> dict:
    ck = Checkpoint(out)
    return {k: ck.read(k, 0, i.numel).clone() for k, i in ck.infos.items()}


@pytest.mark.parametrize("method,kw", [("dare_linear", dict(drop_rate=0.6, seed=11)),
                                       ("dare_ties", dict(drop_rate=0.6, seed=11, density=0.5)),
                                       ("ties", dict(density=0.3))])
def test_bit_identical_across_block_sizes_orders_and_threads(method, kw, tmp_path):
    base, fts, (b, a, bb), b2 = _odd_models(tmp_path)
    outs = {}
    for bs in (1, 7, 4096, None):
        outs[f"bs{bs}"] = _bytes(merge([a, bb], base=b, method=method, out=tmp_path / f"o{bs}", block_size=bs, quiet=True, **kw).out)
    outs["reordered"] = _bytes(merge([a, b2], base=b, method=method, out=tmp_path / "ro", block_size=5, quiet=True, **kw).out)
    outs["threads1"] = _bytes(merge([a, bb], base=b, method=method, out=tmp_path / "t1", threads=1, quiet=True, **kw).out)
    outs["reference"] = _bytes(merge([a, bb], base=b, method=method, out=tmp_path / "ref", kernels="reference", quiet=True, **kw).out)
    first = outs.pop("bs1")
    for label, o in outs.items():
        for k in first:
            assert torch.equal(first[k], o[k]), f"{method}: {label} differs in {k}"
    torch.set_num_threads(2)
    ref = R.task_vector_merge(base, fts, consensus="ties" if "ties" in method else "sum", trim_scope="global" if method == "ties" else "tensor",
                              **{k: v for k, v in kw.items()})
    for k, v in ref.items():
        assert torch.equal(first[k].reshape(v.shape), v.to(first[k].dtype)), k


def test_seed_changes_dare_mask(tmp_path):
    _, _, (b, a, bb), _ = _odd_models(tmp_path)
    x = _bytes(merge([a, bb], base=b, method="dare", drop_rate=0.5, seed=1, out=tmp_path / "s1", quiet=True).out)
    y = _bytes(merge([a, bb], base=b, method="dare", drop_rate=0.5, seed=2, out=tmp_path / "s2", quiet=True).out)
    assert not torch.equal(x["big"], y["big"])


def test_dare_keep_fraction_matches_drop_rate():
    mask = ops.philox_keep_mask(ops.model_key(0, 0, "t"), 12345, 1_000_000, ops.drop_threshold(0.9))
    assert abs(mask.float().mean().item() - 0.1) < 0.002


def test_global_ties_threshold_equals_kthvalue_of_concatenation(tmp_path):
    """The streaming two-pass threshold equals torch.kthvalue on all deltas concatenated."""
    base, fts, (b, a, bb), _ = _odd_models(tmp_path, dtype=torch.bfloat16)
    from weightops.methods import get_method, MergeParams
    from weightops.methods.base import TensorJob

    src_b, src_a = Checkpoint(b), Checkpoint(a)
    def read_block(job, s, e, which=None):
        return src_b.read(job.name, s, e), [src_a.read(job.name, s, e)]
    jobs = [TensorJob(n, i.shape, i.dtype, src_b, [src_a], 5, read_block) for n, i in src_b.infos.items()]
    m = get_method("ties")
    thr = m.prepare_model(jobs, m.resolve(MergeParams(density=0.37), 1))[0]
    allv = torch.cat([(fts[0][k].float() - base[k].float()).abs().flatten() for k in base])
    k = round(0.37 * allv.numel())
    assert thr == allv.kthvalue(allv.numel() - k + 1).values.item()
