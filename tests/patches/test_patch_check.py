"""Compatibility checks (names, shapes, dtypes, renames), the drift report, and refusal of corrupt patches."""
from __future__ import annotations

import json
import math
import pytest
import torch

from checkpoints import write_model
from patchkit import cli, one_error_line, versions  # noqa: F401  (fixture)
from weightops.errors import AlignmentError, CheckpointError
from weightops.io.checkpoint import Checkpoint
from weightops.patches import Patch, apply_patch, check_patch, create_patch
from weightops.patches import reference as ref

Q0 = "encoder.layer.0.attention.self.query.weight"
I1 = "encoder.layer.1.intermediate.dense.weight"


@pytest.fixture(scope="module")
def patch(versions, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("cp") / "patch"
    create_patch(versions["v1"], out, adapter=versions["adapter"], quiet=True)
    return out


def _variant(versions, tmp_path, edit):  # noqa: F811
    sd = {k: v.clone() for k, v in versions["v2_sd"].items()}
    edit(sd)
    return write_model(tmp_path / "v2x", sd)


@pytest.mark.parametrize("kind", ["missing", "shape", "dtype"])
def test_each_incompatibility_is_one_clear_error(versions, patch, tmp_path, kind):  # noqa: F811
    edits = {
        "missing": (lambda sd: sd.pop(Q0), rf"1 patch target\(s\) are missing: '{Q0}'.*--rename"),
        "shape": (lambda sd: sd.__setitem__(I1, sd[I1][:-1].clone()), rf"shape mismatch: '{I1}' is \[39, 24\] .* made for \[40, 24\]"),
        "dtype": (lambda sd: sd.__setitem__(Q0, sd[Q0].half()), f"dtype mismatch: '{Q0}' is float16 .* float32"),
    }
    edit, msg = edits[kind]
    target = _variant(versions, tmp_path, edit)
    rep = check_patch(patch, target)
    assert not rep.ok and [p["problem"] for p in rep.problems] == [kind]
    with pytest.raises(AlignmentError, match=msg):
        rep.raise_if_incompatible()
    with pytest.raises(AlignmentError, match=msg):
        apply_patch(patch, target, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli_check_and_apply_fail_with_one_line(versions, patch, tmp_path, capsys):  # noqa: F811
    target = _variant(versions, tmp_path, lambda sd: sd.__setitem__(I1, sd[I1][:-1].clone()))
    code, out, err = cli(capsys, "patch", "check", patch, "--to", target)
    line = one_error_line(code, err)
    assert "shape mismatch" in line and I1 in line and "8/9 targets fit" in out
    line = one_error_line(*cli(capsys, "patch", "apply", patch, "--to", target, "--out", tmp_path / "out")[::2])
    assert "shape mismatch" in line and not (tmp_path / "out").exists()


def test_cli_check_prints_the_drift_table(versions, patch, capsys):  # noqa: F811
    code, out, _ = cli(capsys, "patch", "check", patch, "--to", versions["v2"], "--from", versions["v1"], "--top", "0")
    assert code == 0 and "9/9 targets fit" in out
    assert sum(line.startswith("encoder.layer.") for line in out.splitlines()) == 6


def test_rename_rules_map_renamed_modules(versions, patch, tmp_path):  # noqa: F811
    renamed = {k.replace("encoder.layer.", "blocks."): v for k, v in versions["v2_sd"].items()}
    write_model(tmp_path / "v2r", renamed)
    assert {p["problem"] for p in check_patch(patch, tmp_path / "v2r").problems} == {"missing"}
    rules = [r"^encoder\.layer\.(\d+)\.=>blocks.\1."]
    rep = check_patch(patch, tmp_path / "v2r", rename=rules)
    assert rep.ok and rep.mapping[Q0] == "blocks.0.attention.self.query.weight"
    apply_patch(patch, tmp_path / "v2r", tmp_path / "out", rename=rules, quiet=True)
    want = ref.apply(renamed, patch, mapping=rep.mapping)
    got = Checkpoint(tmp_path / "out").load()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_rename_collision_is_refused(patch, versions):  # noqa: F811
    rep = check_patch(patch, versions["v2"], rename={r"layer\.\d+": "layer.0"})
    assert "collision" in {p["problem"] for p in rep.problems}
    with pytest.raises(AlignmentError, match="map several targets onto"):
        rep.raise_if_incompatible()


def test_drift_report_matches_direct_norms(versions, patch):  # noqa: F811
    rep = check_patch(patch, versions["v2"], source=versions["v1"])
    assert rep.ok and rep.source_matches is True
    deltas = ref.patch_deltas(patch)
    v1, v2 = versions["v1_sd"], versions["v2_sd"]
    assert {r["name"] for r in rep.drift} == set(deltas)
    for r in rep.drift:
        kind, x = deltas[r["name"]]
        want_patch = float(x.norm()) if kind == "delta" else float((x.double() - v1[r["name"]].double()).norm())
        assert r["patch_norm"] == pytest.approx(want_patch, rel=1e-9)
        assert r["drift_norm"] == pytest.approx(float((v2[r["name"]].double() - v1[r["name"]].double()).norm()), rel=1e-9)
        assert r["drift_over_patch"] == pytest.approx(r["drift_norm"] / r["patch_norm"])


def test_drift_against_the_wrong_v1_is_flagged(versions, patch):  # noqa: F811
    rep = check_patch(patch, versions["v2"], source=versions["ft"])
    assert rep.ok and rep.source_matches is False
    assert any("not the base this patch was made from" in n for n in rep.notes)
    assert all(math.isfinite(r["drift_norm"]) for r in rep.drift)


def _copy(patch, dst):
    dst.mkdir()
    for f in patch.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("damage", ["flip-data", "edit-scale", "truncate", "drop-tensor-sum"])
def test_corrupt_patch_is_refused(patch, tmp_path, damage, versions):  # noqa: F811
    bad = _copy(patch, tmp_path / "bad")
    st, meta_path = bad / "patch.safetensors", bad / "patch.json"
    if damage == "flip-data":
        raw = bytearray(st.read_bytes())
        raw[-3] ^= 0x40
        st.write_bytes(bytes(raw))
        msg = "fails its sha256 check"
    elif damage == "edit-scale":
        meta = json.loads(meta_path.read_text())
        meta["entries"][Q0]["scale"] = 20.0
        meta_path.write_text(json.dumps(meta))
        msg = "checksum mismatch"
    elif damage == "truncate":
        st.write_bytes(st.read_bytes()[:-10])
        msg = "truncated"
    else:
        meta = json.loads(meta_path.read_text())
        meta["tensor_sha256"].pop(Q0 + ".lora_A")
        meta["meta_sha256"] = __import__("weightops.patches.format", fromlist=["x"]).meta_checksum(meta)
        meta_path.write_text(json.dumps(meta))
        msg = "do not match patch.json"
    with pytest.raises(CheckpointError, match=msg):
        Patch(bad)
    with pytest.raises(CheckpointError, match=msg):
        apply_patch(bad, versions["v2"], tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_corrupt_patch_with_one_line(patch, tmp_path, versions, capsys):  # noqa: F811
    bad = _copy(patch, tmp_path / "bad")
    raw = bytearray((bad / "patch.safetensors").read_bytes())
    raw[-1] ^= 0x01
    (bad / "patch.safetensors").write_bytes(bytes(raw))
    line = one_error_line(*cli(capsys, "patch", "apply", bad, "--to", versions["v2"], "--out", tmp_path / "out")[::2])
    assert "sha256" in line and "re-create" in line
    assert not (tmp_path / "out").exists()


def test_not_a_patch(tmp_path):
    with pytest.raises(CheckpointError, match="not a patch directory"):
        Patch(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="patch.json is missing"):
        Patch(tmp_path / "d")
