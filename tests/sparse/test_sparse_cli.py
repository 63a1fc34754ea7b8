"""The CLI commands of the sparse family, run in-process through weightops.cli.main (exit codes included)."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from weightops.io.checkpoint import Checkpoint


def run(monkeypatch, capsys, *args):
    from weightops.cli import main

    monkeypatch.setattr(sys, "argv", ["weightops", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_graft_compose_reset_mask_commands(tmp_path, tiny_models, monkeypatch, capsys):
    b, f0, f1 = tiny_models["base"], tiny_models["ft0"], tiny_models["ft1"]
    rc, out, err = run(monkeypatch, capsys, "graft", "--base", b, "--finetuned", f0, "--sparsity", "0.01",
                       "--out", tmp_path / "g", "--mask-out", tmp_path / "m0", "--delta-out", tmp_path / "d0", "-q")
    assert rc == 0, err
    rc, out, err = run(monkeypatch, capsys, "graft", "-b", b, "-f", f1, "--k", "100", "--mask-out", tmp_path / "m1",
                       "--delta-out", tmp_path / "d1")
    assert rc == 0 and "100 parameters selected" in out, err
    rc, out, err = run(monkeypatch, capsys, "mask", "overlap", tmp_path / "m0", tmp_path / "m1", "--labels", "a,b",
                       "--png", tmp_path / "o.png", "--json", tmp_path / "o.json")
    assert rc == 0 and "a vs b" in out and (tmp_path / "o.png").stat().st_size > 1000
    assert json.loads((tmp_path / "o.json").read_text())["labels"] == ["a", "b"]
    rc, out, err = run(monkeypatch, capsys, "compose", b, tmp_path / "d0", tmp_path / "d1", "--out", tmp_path / "c")
    assert rc == 0 and "overlapping positions" in out and not err.strip(), err
    rc, out, err = run(monkeypatch, capsys, "reset", "-b", b, "-f", f0, "--out", tmp_path / "r", "--by", "tensor",
                       "--seed", "2")
    assert rc == 0 and "back to the base" in out, err
    rc, out, err = run(monkeypatch, capsys, "mask", "union", tmp_path / "m0", tmp_path / "m1", "-o", tmp_path / "u")
    assert rc == 0, err
    rc, out, err = run(monkeypatch, capsys, "mask", "info", tmp_path / "u")
    assert rc == 0 and "mask" in out
    # graft --mask with the union applies it; the grafted model is θ0 where the union does not select
    rc, out, err = run(monkeypatch, capsys, "graft", "-b", b, "-f", f0, "--mask", tmp_path / "m0", "--out", tmp_path / "g2", "-q")
    assert rc == 0, err
    g, g2 = Checkpoint(tmp_path / "g").load(), Checkpoint(tmp_path / "g2").load()
    assert all(torch.equal(g[n], g2[n]) for n in g)


def test_cli_errors_are_one_line(tmp_path, tiny_models, monkeypatch, capsys):
    b, f0 = tiny_models["base"], tiny_models["ft0"]
    cases = [
        ("graft", "-b", b, "-f", f0, "--sparsity", "0.5"),                      # nothing to write
        ("graft", "-b", b, "-f", f0, "--sparsity", "3", "--out", tmp_path / "x"),
        ("mask", "info", tmp_path),                                             # not a mask
        ("compose", b, b, "--out", tmp_path / "x"),                             # a model is not a delta
        ("reset", "-b", b, "-f", f0, "--out", tmp_path / "x", "--by", "cell"),
    ]
    for args in cases:
        rc, out, err = run(monkeypatch, capsys, *args)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, err)
    assert not (tmp_path / "x").exists()
