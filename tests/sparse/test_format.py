"""The sparse file format: round trips, streaming access, and refusal of bad files."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import make_bert_state, write_model
from weightops.errors import AlignmentError, CheckpointError, OutputError, WeightopsError
from weightops.io.checkpoint import Checkpoint
from weightops.sparse import (SparseWriter, apply_mask, apply_sparse_delta, index_dtype, open_sparse, read_mask,
                              read_sparse_delta, write_mask, write_sparse_delta)

SHAPES = [(5, 7), (1,), (0,), (3, 4, 5), (40000,)]


def _random_entries(seed, shapes=SHAPES, value_dtype=torch.float32, density=0.3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(shapes):
        n = 1
        for s in shape:
            n *= s
        keep = torch.rand(n, generator=g) < density
        idx = keep.nonzero().flatten()
        vals = torch.randn(idx.numel(), generator=g).to(value_dtype)
        out.append((f"t{i}", shape, torch.bfloat16, idx, vals))
    return out


def _dense(shape, idx, vals):
    n = 1
    for s in shape:
        n *= s
    d = torch.zeros(n, dtype=torch.float32)
    if idx is None:
        d[:] = vals.float()
    else:
        d[idx] = vals.float()
    return d


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_delta_round_trip_and_blocks(tmp_path, value_dtype):
    entries = _random_entries(0, value_dtype=value_dtype)
    entries.append(("dense", (2, 3), torch.float32, None, torch.randn(6).to(value_dtype)))
    write_sparse_delta(tmp_path / "d", iter(entries), {"note": "x"})
    f = read_sparse_delta(tmp_path / "d")
    assert f.manifest["note"] == "x" and f.kind == "delta"
    assert f.nnz == sum(v.numel() for *_, v in entries)
    for name, shape, dtype, idx, vals in entries:
        t = f.tensors[name]
        assert t.shape == shape and t.dtype == dtype and t.value_dtype == value_dtype
        want = _dense(shape, idx, vals)
        assert torch.equal(f.values(name), vals)
        if idx is not None:
            assert torch.equal(f.indices(name), idx)
        # block access with a block size that does not divide the tensor
        for bs in ((1, 3) if t.numel < 100 else (4096, 7919)):
            got = torch.cat([f.delta_block(name, s, min(t.numel, s + bs)) for s in range(0, t.numel, bs)] or [torch.zeros(0)])
            assert torch.equal(got, want)


def test_index_dtype_is_compact(tmp_path):
    assert index_dtype(1) == torch.int16 and index_dtype(1 << 15) == torch.int16
    assert index_dtype((1 << 15) + 1) == torch.int32 and index_dtype(1 << 31) == torch.int32
    assert index_dtype((1 << 31) + 1) == torch.int64
    write_mask(tmp_path / "m", [("a", (32768,), torch.float32, torch.tensor([0, 32767])),
                                ("b", (32769,), torch.float32, torch.tensor([32768]))])
    f = read_mask(tmp_path / "m")
    assert f.file.tensors["a.indices"].dtype == torch.int16 and f.file.tensors["b.indices"].dtype == torch.int32
    assert f.mask_block("a", 32760, 32768)[-1] and f.mask_block("b", 32768, 32769).all()


def test_chunked_writer_equals_one_shot(tmp_path):
    entries = _random_entries(1)
    write_sparse_delta(tmp_path / "one", iter(entries))
    with SparseWriter(tmp_path / "chunks", "delta") as w:
        for name, shape, dtype, idx, vals in entries:
            w.begin(name, shape, dtype)
            for s in range(0, idx.numel(), 7):
                w.add(idx[s:s + 7], vals[s:s + 7])
            w.end()
        w.commit()
    a, b = (tmp_path / "one" / "sparse.safetensors").read_bytes(), (tmp_path / "chunks" / "sparse.safetensors").read_bytes()
    assert a == b


def test_writer_refuses_bad_entries_and_leaves_nothing(tmp_path):
    bad = [
        [("a", (10,), torch.float32, torch.tensor([3, 2]), torch.ones(2))],       # not increasing
        [("a", (10,), torch.float32, torch.tensor([3, 3]), torch.ones(2))],       # duplicate
        [("a", (10,), torch.float32, torch.tensor([10]), torch.ones(1))],         # out of range
        [("a", (10,), torch.float32, torch.tensor([1, 2]), torch.ones(3))],       # length mismatch
        [("a", (10,), torch.float32, torch.tensor([1]), torch.tensor([float("nan")]))],
        [("a", (10,), torch.float32, None, torch.ones(9))],                       # dense, too short
        [("a", (10,), torch.float32, torch.tensor([1]), torch.ones(1)), ("a", (10,), torch.float32, torch.tensor([1]), torch.ones(1))],
    ]
    for entries in bad:
        with pytest.raises(WeightopsError):
            write_sparse_delta(tmp_path / "d", iter(entries))
        assert not list(tmp_path.iterdir()), "a refused write left files behind"
    write_mask(tmp_path / "m", [("a", (3,), torch.float32, torch.tensor([1]))])
    with pytest.raises(OutputError):
        write_mask(tmp_path / "m", [("a", (3,), torch.float32, torch.tensor([1]))])


def _corrupt(path, how):
    data = path / "sparse.safetensors"
    man = path / "sparse.json"
    if how == "truncate":
        data.write_bytes(data.read_bytes()[:-4])
    elif how == "flip":
        raw = bytearray(data.read_bytes())
        raw[-1] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif how == "no-manifest":
        man.unlink()
    elif how == "bad-json":
        man.write_text("{not json")
    elif how == "wrong-nnz":
        m = json.loads(man.read_text())
        m["tensors"]["a"]["nnz"] = 1
        man.write_text(json.dumps(m))
    elif how == "unsorted":
        # rewrite the indices in place and fix the hash: only the index check can catch it
        import hashlib

        f = open_sparse(path)
        info = f.file.tensors["a.indices"]
        f.close()
        raw = bytearray(data.read_bytes())
        raw[info.start:info.start + 4] = torch.tensor([5, 2], dtype=torch.int16).numpy().tobytes()
        data.write_bytes(bytes(raw))
        m = json.loads(man.read_text())
        m["data"]["sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
        man.write_text(json.dumps(m))


@pytest.mark.parametrize("how", ["truncate", "flip", "no-manifest", "bad-json", "wrong-nnz", "unsorted"])
def test_corrupt_files_are_refused(tmp_path, how):
    write_sparse_delta(tmp_path / "d", [("a", (10,), torch.float32, torch.tensor([2, 5]), torch.ones(2))])
    _corrupt(tmp_path / "d", how)
    with pytest.raises(CheckpointError) as e:
        read_sparse_delta(tmp_path / "d")
    assert "\n" not in str(e.value)


def test_mask_is_not_a_delta(tmp_path):
    write_mask(tmp_path / "m", [("a", (3,), torch.float32, torch.tensor([1]))])
    with pytest.raises(WeightopsError, match="not a sparse delta"):
        read_sparse_delta(tmp_path / "m")


# -- applying to models -------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base = make_bert_state(3, torch.bfloat16)
    ft = make_bert_state(4, base=base, scale=0.05)
    return {"base": write_model(root / "base", base), "ft": write_model(root / "ft", ft, shards=2), "base_sd": base, "ft_sd": ft}


def _float_names(sd):
    return [k for k, v in sd.items() if v.is_floating_point()]


def test_apply_mask_all_and_nothing(tmp_path, bf16_pair):
    base_sd, ft_sd = bf16_pair["base_sd"], bf16_pair["ft_sd"]
    names = _float_names(base_sd)
    write_mask(tmp_path / "all", [(n, base_sd[n].shape, base_sd[n].dtype, None) for n in names])
    write_mask(tmp_path / "none", [(n, base_sd[n].shape, base_sd[n].dtype, torch.zeros(0, dtype=torch.int64)) for n in names])
    # a sparse "all" mask (every index listed) must give the same bytes as the dense one
    write_mask(tmp_path / "all_idx", [(n, base_sd[n].shape, base_sd[n].dtype, torch.arange(base_sd[n].numel())) for n in names])
    for mask, want in (("all", ft_sd), ("none", base_sd), ("all_idx", ft_sd)):
        apply_mask(bf16_pair["base"], bf16_pair["ft"], tmp_path / mask, tmp_path / f"out_{mask}", block_size=1000, quiet=True)
        got = Checkpoint(tmp_path / f"out_{mask}").load()
        for n in base_sd:
            assert torch.equal(got[n], want[n] if n in names else base_sd[n]), (mask, n)


def test_apply_sparse_delta_matches_dense_reference(tmp_path, bf16_pair):
    base_sd = bf16_pair["base_sd"]
    g = torch.Generator().manual_seed(7)
    entries = []
    for n in _float_names(base_sd)[::2]:
        t = base_sd[n]
        idx = (torch.rand(t.numel(), generator=g) < 0.2).nonzero().flatten()
        entries.append((n, tuple(t.shape), t.dtype, idx, torch.randn(idx.numel(), generator=g) * 0.01))
    write_sparse_delta(tmp_path / "d", entries)
    apply_sparse_delta(bf16_pair["base"], tmp_path / "d", tmp_path / "out", scales=[0.5], block_size=777, quiet=True)
    got = Checkpoint(tmp_path / "out").load()
    touched = {e[0]: e for e in entries}
    for n, t in base_sd.items():
        if n in touched:
            _, shape, _, idx, vals = touched[n]
            want = (t.float().flatten() + 0.5 * _dense(shape, idx, vals)).to(t.dtype).reshape(t.shape)
        else:
            want = t
        assert torch.equal(got[n], want), n


def test_mismatched_mask_is_refused(tmp_path, bf16_pair):
    write_mask(tmp_path / "m", [("embeddings.word_embeddings.weight", (3, 3), torch.float32, torch.tensor([0]))])
    with pytest.raises(AlignmentError, match="is \\[3, 3\\] there"):
        apply_mask(bf16_pair["base"], bf16_pair["ft"], tmp_path / "m", tmp_path / "out", quiet=True)
    write_mask(tmp_path / "m2", [("no.such.tensor", (3,), torch.float32, torch.tensor([0]))])
    with pytest.raises(AlignmentError, match="lacks"):
        apply_mask(bf16_pair["base"], bf16_pair["ft"], tmp_path / "m2", tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
