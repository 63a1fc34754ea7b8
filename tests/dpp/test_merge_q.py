"""DAREx-q in `weightops merge`: one q per model, and `--q auto` scoring exactly the mask merge draws."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from _fixtures import tiny_bert  # noqa: F401  (fixture)
from weightops.cli import app
from weightops.engine import merge
from weightops.io.checkpoint import Checkpoint


def test_per_model_q_list(tmp_path, tiny_models):
    ms = [tiny_models["ft0"], tiny_models["ft1"]]
    kw = dict(base=tiny_models["base"], method="dare_linear", drop_rate=0.8, rescale="darex-q", quiet=True)
    merge(ms, out=tmp_path / "a", q=0.5, **kw)
    merge(ms, out=tmp_path / "b", q=[0.5, 0.5], **kw)
    merge(ms, out=tmp_path / "c", q=[0.5, 0.9], **kw)
    a, b, c = (Checkpoint(tmp_path / x).load() for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    m = json.loads((tmp_path / "c" / "weightops.json").read_text())
    assert m["params"]["q"] == [0.5, 0.9]


@pytest.mark.slow  # ~10-20 s: a proxy q search through the merge CLI
def test_merge_q_auto_matches_prune_with_that_q(tmp_path, tiny_bert):  # noqa: F811
    from weightops.dpp.api import prune

    res = CliRunner().invoke(app, ["merge", str(tiny_bert["ft"]), "--base", str(tiny_bert["base"]), "--method", "dare",
                                   "--drop-rate", "0.95", "--rescale", "darex-q", "--q", "auto", "--proxy-data",
                                   str(tiny_bert["texts"]), "--out", str(tmp_path / "m"), "--quiet"])
    assert res.exit_code == 0, res.output
    q = json.loads((tmp_path / "m" / "weightops.json").read_text())["params"]["q"]
    assert len(q) == 1 and 0.05 <= q[0] <= 1.0
    prune(tiny_bert["base"], tiny_bert["ft"], out=tmp_path / "p", method="darex-q", rate=0.95, q=q[0], quiet=True)
    a, b = Checkpoint(tmp_path / "p").load(), Checkpoint(tmp_path / "m").load()
    assert all(torch.equal(a[k], b[k]) for k in a)  # prune darex-q == merge dare_linear/darex-q, same q and mask


def test_merge_q_auto_errors(tmp_path, tiny_models):
    res = CliRunner().invoke(app, ["merge", str(tiny_models["ft0"]), "--base", str(tiny_models["base"]), "--method",
                                   "dare", "--q", "auto", "--out", str(tmp_path / "m")])
    assert res.exit_code != 0 and "--rescale darex-q" in str(res.exception or res.output)
    assert not (tmp_path / "m").exists()
