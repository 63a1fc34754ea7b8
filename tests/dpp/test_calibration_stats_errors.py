"""WANDA norms and signed means from hooks match a direct computation; delta-stats matches torch;
the recommendation follows its rule; bad inputs give one clear error and write nothing."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from _fixtures import odd_pairs, tiny_bert  # noqa: F401  (fixtures)
from weightops.errors import WeightopsError


def test_wanda_norms_and_means_match_direct_computation(tiny_bert):  # noqa: F811
    from weightops.dpp.calibration import calibrate, load_model
    from weightops.dpp.q_search import read_texts, tokenize

    texts = read_texts(str(tiny_bert["texts"]))[:9]
    stats = calibrate(tiny_bert["ft"], texts, max_len=16, batch_size=4)
    model = load_model(tiny_bert["ft"])
    batch = dict(tokenize(tiny_bert["ft"], texts, 16))
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        emb = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        out = model(**batch, output_hidden_states=True)
    # the query projection of layer 0 sees the embeddings; the pooler's dense sees the [CLS] state
    x = emb[mask].double()
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(stats.norm[name], (x.pow(2).sum(0) / len(texts)).sqrt(), rtol=1e-5, atol=1e-7)
    assert torch.allclose(stats.mean[name], x.mean(0), rtol=1e-5, atol=1e-7)
    cls = out.hidden_states[-1][:, 0].double()
    assert torch.allclose(stats.norm["pooler.dense.weight"], (cls.pow(2).sum(0) / len(texts)).sqrt(), rtol=1e-5, atol=1e-7)
    assert torch.allclose(stats.mean["pooler.dense.weight"], cls.mean(0), rtol=1e-5, atol=1e-7)
    assert stats.tokens == int(mask.sum()) and stats.sequences == len(texts)


def test_wanda_end_to_end_uses_the_norms(tmp_path, tiny_bert):  # noqa: F811
    from weightops.dpp import reference as R
    from weightops.dpp.api import prune
    from weightops.dpp.calibration import calibrate
    from weightops.dpp.q_search import read_texts
    from weightops.io.checkpoint import Checkpoint

    prune(tiny_bert["base"], tiny_bert["ft"], out=tmp_path / "w", method="wanda", rate=0.7,
          calib_data=str(tiny_bert["texts"]), quiet=True)
    norms = calibrate(tiny_bert["ft"], read_texts(str(tiny_bert["texts"]))).norm
    want = R.prune(tiny_bert["base_sd"], tiny_bert["ft_sd"], "wanda", 0.7, scope="row", norms=norms)
    got = Checkpoint(tmp_path / "w").load()
    assert all(torch.equal(got[k], want[k]) for k in want)
    mag = R.prune(tiny_bert["base_sd"], tiny_bert["ft_sd"], "wanda", 0.7, scope="row", norms=None)
    assert not torch.equal(got["encoder.layer.0.attention.self.query.weight"],
                           mag["encoder.layer.0.attention.self.query.weight"])  # the norms changed the choice


def test_delta_stats_match_torch(odd_pairs):  # noqa: F811
    from weightops.dpp.stats import delta_stats

    b, f, bsd, fsd = odd_pairs["float32"]
    r = delta_stats(b, f, block_size=400)
    rows = {x["name"]: x for x in r["tensors"]}
    d = (fsd["w.a"].double() - bsd["w.a"].double()).flatten()
    x = rows["w.a"]
    assert x["mean"] == pytest.approx(d.mean().item()) and x["std"] == pytest.approx(d.std(unbiased=False).item())
    assert x["max_abs"] == pytest.approx(d.abs().max().item())
    a = (fsd["w.a"].float() - bsd["w.a"].float()).abs().flatten().sort().values
    n = a.numel()
    import math
    for pct in (50, 90, 99):
        assert x[f"p{pct}"] == a[math.ceil(pct / 100 * n) - 1].item()  # nearest-rank percentile, exact
    assert rows["w.empty"]["numel"] == 0 and r["model"]["numel"] == sum(v.numel() for k, v in bsd.items() if k != "ids")


def test_recommendation_rule():
    from weightops.dpp.stats import recommend_dpp

    small = {"model": {"mean": 0.0, "std": 1e-3, "p99": 2e-3, "max_abs": 4e-3}}
    large = {"model": {"mean": 0.0, "std": 1e-2, "p99": 3e-2, "max_abs": 0.1}}
    assert recommend_dpp(large, rate=0.9)["method"] == "magnitude"
    assert recommend_dpp(large, rate=0.9, calibration=True)["method"] == "wanda"
    assert recommend_dpp(small, rate=0.5)["method"] == "dare"
    r = recommend_dpp(small, rate=0.99, validation=True, unlabelled=True)
    assert (r["method"], r["q_by"]) == ("darex-q", "metric")
    assert recommend_dpp(small, rate=0.99, unlabelled=True)["q_by"] == "proxy"
    assert recommend_dpp(small, rate=0.99)["method"] == "magnitude"
    assert all(isinstance(s, str) and s for s in r["reasons"])


@pytest.mark.parametrize("kw,msg", [
    (dict(rate=1.0), "--rate"), (dict(rate=-0.1), "--rate"), (dict(rate=float("nan")), "--rate"),
    (dict(method="darex-q", rate=0.9, q=0.05), "--q must be in"), (dict(method="darex-q", rate=0.9, q=1.5), "--q must be in"),
    (dict(method="darex-q", rate=0.9, q="auto"), "darex-q needs"),
    (dict(method="darex-q", rate=0.9, q="auto", q_by="analytic"), "needs --calib-data"),
    (dict(method="wanda", rate=0.5), "calibration inputs"), (dict(method="dare", q=0.5), "only used with"),
    (dict(method="magnitude", scope="row-ish"), "not valid"), (dict(method="della", rate=0.99, epsilon=0.5), "--epsilon"),
    (dict(method="nope"), "unknown pruning method"), (dict(format="zip"), "--format"),
    (dict(method="darex-q", rate=0.9, q="auto", proxy_data="/nonexistent.txt"), "not found"),
])
def test_bad_inputs_raise_clear_errors(tmp_path, tiny_models, kw, msg):
    from weightops.dpp.api import prune

    with pytest.raises(WeightopsError, match=msg):
        prune(tiny_models["base"], tiny_models["ft0"], out=tmp_path / "o", quiet=True, **kw)
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_cli_bad_input_exit_code_and_nothing_written(tmp_path, tiny_models):
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "weightops", "prune", "--base", str(tiny_models["base"]), "--finetuned",
                        str(tiny_models["ft0"]), "--out", str(out), "--method", "darex-q", "--rate", "0.99",
                        "--q", "0.001"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "error: --q must be in" in r.stderr
    assert not out.exists()


def test_cli_delta_stats_recommend_and_delta_round_trip(tmp_path, tiny_models):
    import json

    from typer.testing import CliRunner

    from weightops.cli import app
    from weightops.io.checkpoint import Checkpoint

    b, f = str(tiny_models["base"]), str(tiny_models["ft0"])
    r = CliRunner().invoke(app, ["delta-stats", b, f, "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["model"]["numel"] > 0
    r = CliRunner().invoke(app, ["recommend-dpp", b, f, "--rate", "0.99", "--unlabelled"])
    assert r.exit_code == 0 and "recommended: magnitude" in r.output  # the tiny fine-tunes have p99 |δ| ~ 0.05: large
    for fmt, out in (("model", "m"), ("delta", "d")):
        r = CliRunner().invoke(app, ["prune", "--base", b, "--finetuned", f, "--out", str(tmp_path / out), "--method",
                                     "della", "--rate", "0.8", "--format", fmt])
        assert r.exit_code == 0 and "kept" in r.output, r.output
    r = CliRunner().invoke(app, ["apply-delta", b, str(tmp_path / "d"), "--out", str(tmp_path / "a"), "--quiet"])
    assert r.exit_code == 0, r.output
    x, y = Checkpoint(tmp_path / "m").load(), Checkpoint(tmp_path / "a").load()
    assert all(torch.equal(x[k], y[k]) for k in x)
