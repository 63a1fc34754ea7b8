"""Bad input ends in one clear error line, a non-zero exit, and no output left behind."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import make_bert_state, write_model


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "weightops", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def assert_one_line_error(res, *needles):
    assert res.returncode != 0, res.stdout
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith((".out", "out"))]


@pytest.fixture()
def pair(tmp_path):
    base = make_bert_state(0)
    return tmp_path, write_model(tmp_path / "base", base), write_model(tmp_path / "ft", make_bert_state(1, base=base)), base


def test_missing_path(pair):
    root, b, ft, _ = pair
    assert_one_line_error(run_cli("merge", ft, root / "nope", "--base", b, "--out", root / "out"), "no such file")
    assert leftovers(root) == []


def test_not_a_checkpoint(pair):
    root, b, ft, _ = pair
    (root / "empty").mkdir()
    assert_one_line_error(run_cli("merge", ft, root / "empty", "--base", b, "--out", root / "out"), "not a checkpoint")


def test_pickled_bin_refused(pair):
    root, b, ft, _ = pair
    (root / "pt").mkdir()
    torch.save({"w": torch.zeros(2)}, root / "pt" / "pytorch_model.bin")
    assert_one_line_error(run_cli("merge", ft, root / "pt", "--base", b, "--out", root / "out"), "never unpickles", "save_pretrained")


@pytest.mark.parametrize("damage", ["truncate-data", "truncate-header", "garbage-header", "huge-length"])
def test_corrupt_safetensors(pair, damage):
    root, b, ft, _ = pair
    bad = root / "bad"
    bad.mkdir()
    raw = (ft / "model.safetensors").read_bytes()
    if damage == "truncate-data":
        raw = raw[:-100]
    elif damage == "truncate-header":
        raw = raw[:20]
    elif damage == "garbage-header":
        raw = raw[:8] + b"{not json" + raw[17:]
    else:
        raw = (2**60).to_bytes(8, "little") + raw[8:]
    (bad / "model.safetensors").write_bytes(raw)
    res = run_cli("merge", ft, bad, "--base", b, "--out", root / "out")
    assert_one_line_error(res, "bad/model.safetensors")
    assert any(w in res.stderr for w in ("truncated", "corrupt"))
    assert leftovers(root) == []


def test_shape_mismatch(pair):
    root, b, ft, base = pair
    sd = dict(make_bert_state(2, base=base))
    sd["pooler.dense.weight"] = torch.zeros(24, 23)
    other = write_model(root / "other", sd)
    assert_one_line_error(run_cli("merge", ft, other, "--base", b, "--out", root / "out"), "shape mismatch", "pooler.dense.weight")
    assert leftovers(root) == []


def test_dtype_mismatch(pair):
    root, b, ft, base = pair
    other = write_model(root / "half", {k: v.half() if v.is_floating_point() else v for k, v in make_bert_state(2, base=base).items()})
    assert_one_line_error(run_cli("merge", ft, other, "--base", b, "--method", "task_arithmetic", "--out", root / "out"), "dtype mismatch")
    res = run_cli("merge", ft, other, "--base", b, "--method", "task_arithmetic", "--allow-dtype-mix", "--out", root / "out", "-q")
    assert res.returncode == 0, res.stderr


def test_missing_tensor_and_allow_missing(pair):
    root, b, ft, base = pair
    sd = make_bert_state(2, base=base)
    del sd["pooler.dense.bias"]
    other = write_model(root / "lacks", sd)
    assert_one_line_error(run_cli("merge", ft, other, "--base", b, "--method", "ties", "--out", root / "out"),
                          "lacks 1 tensor", "pooler.dense.bias", "--allow-missing")
    res = run_cli("merge", ft, other, "--base", b, "--method", "ties", "--allow-missing", "--out", root / "out", "-q")
    assert res.returncode == 0 and "copied from the base" in res.stderr
    from weightops.io.checkpoint import Checkpoint
    assert torch.equal(Checkpoint(root / "out").load(["pooler.dense.bias"])["pooler.dense.bias"], base["pooler.dense.bias"])


def test_nan_warns_and_strict_fails(pair):
    root, b, ft, base = pair
    sd = make_bert_state(2, base=base)
    sd["pooler.dense.weight"][0, 0] = float("nan")
    other = write_model(root / "nan", sd)
    res = run_cli("merge", ft, other, "--base", b, "--method", "linear", "--out", root / "out", "-q")
    assert res.returncode == 0 and "NaN/Inf in input tensor 'pooler.dense.weight'" in res.stderr
    assert_one_line_error(run_cli("merge", ft, other, "--base", b, "--strict", "--out", root / "out2"), "NaN/Inf", "pooler.dense.weight")
    assert not (root / "out2").exists()


def test_fp16_overflow_fails_or_clamps(pair):
    root, b, ft, base = pair
    big = {k: (v * 4e4 if v.is_floating_point() else v) for k, v in base.items()}
    a, c = write_model(root / "big1", big), write_model(root / "big2", big)
    assert_one_line_error(run_cli("merge", a, c, "--method", "linear", "--weights", "1,1", "--no-normalize",
                                  "--dtype", "float16", "--out", root / "out"), "exceed the float16 range", "--clamp")
    assert not (root / "out").exists()
    res = run_cli("merge", a, c, "--method", "linear", "--weights", "1,1", "--no-normalize", "--dtype", "float16",
                  "--clamp", "--out", root / "out", "-q")
    assert res.returncode == 0 and "clamped" in res.stderr


def test_existing_output_needs_force(pair):
    root, b, ft, _ = pair
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("x")
    assert_one_line_error(run_cli("merge", ft, ft, "--out", root / "out"), "exists", "--force")
    assert (root / "out" / "keep.txt").exists()
    assert run_cli("merge", ft, ft, "--out", root / "out", "--force", "-q").returncode == 0
    assert not (root / "out" / "keep.txt").exists() and (root / "out" / "model.safetensors").exists()


def test_unknown_method_and_bad_knob(pair):
    root, b, ft, _ = pair
    assert_one_line_error(run_cli("merge", ft, "--base", b, "--method", "nope", "--out", root / "out"), "unknown method")
    assert_one_line_error(run_cli("merge", ft, "--base", b, "--method", "linear", "--density", "0.5", "--out", root / "out"),
                          "does not take --density")
    assert_one_line_error(run_cli("merge", ft, "--method", "ties", "--out", root / "out"), "needs --base")


def test_disk_full_cleans_up(pair, monkeypatch):
    """A write that fails with ENOSPC removes the temporary directory and says so in one line."""
    root, b, ft, _ = pair
    from weightops.engine import merge
    from weightops.errors import OutputError
    import weightops.io.writer as W

    real_open = open
    class FullFile:
        def __init__(self, f): self.f = f
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")
        def __getattr__(self, k): return getattr(self.f, k)
    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return FullFile(f) if "w" in mode and str(path).endswith(".safetensors") else f
    monkeypatch.setattr(W, "open", fake_open, raising=False)
    with pytest.raises(OutputError, match="no space left on device"):
        merge([ft, ft], out=root / "out", quiet=True)
    assert not (root / "out").exists()
    assert not [p for p in root.iterdir() if "weightops-tmp" in p.name]


def test_not_enough_space_is_checked_first(pair, monkeypatch):
    root, b, ft, _ = pair
    import shutil
    from collections import namedtuple
    from weightops.engine import merge
    from weightops.errors import OutputError
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10, 10, 10))
    with pytest.raises(OutputError, match="not enough disk space"):
        merge([ft, ft], out=root / "out", quiet=True)
    assert not (root / "out").exists()


def test_input_modified_during_run_fails_only_that_file(tmp_path):
    """A file truncated while its hash is pending fails its own sha256, not another file's."""
    import threading

    from weightops.errors import CheckpointError
    from weightops.io.safetensors_file import SafetensorsFile, _background

    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(4096)}, str(tmp_path / "b.safetensors"))
    a, b = SafetensorsFile(tmp_path / "a.safetensors"), SafetensorsFile(tmp_path / "b.safetensors")
    gate = threading.Event()
    _background().submit(gate.wait)  # hold the hash thread so a's hash is still pending
    a.read(a.tensors["w"], 0, 4096)
    (tmp_path / "a.safetensors").write_bytes(b"")  # truncated in place, as a tampering test does
    gate.set()
    want = __import__("hashlib").sha256((tmp_path / "b.safetensors").read_bytes()).hexdigest()
    assert b.sha256() == want
    with pytest.raises(CheckpointError, match="a.safetensors: cannot hash the input"):
        a.sha256()
    a.close()
    b.close()
