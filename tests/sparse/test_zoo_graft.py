"""The real phenomenon on the zoo's all-MiniLM-L6-v2 sentiment fine-tune: a small graft recovers most of it.

The zoo fine-tunes use AdamW, whose deltas are small and nearly uniform in size,
so top-|δ| needs ~10% of the layer parameters here (examples/grafting.py has
the whole curve); the head and pooler, trained from scratch, are taken whole."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_graft_one_percent_recovers_most_of_the_finetune(tmp_path):
    from weightops import zoo
    from weightops.sparse.graft import graft

    base, ft = zoo.get("base", fast=True), zoo.get("sentiment-ft-lr1e-4-s0", fast=True)
    acc = lambda d: zoo.evaluate(d, "sentiment", split="test", limit=300)  # noqa: E731
    head = r"^(classifier|bert\.pooler)\."
    graft(base, ft, out=tmp_path / "head", k=0, whole=head)
    graft(base, ft, out=tmp_path / "g", sparsity=0.1, whole=head)
    a_ft, a_head, a_graft = acc(ft), acc(tmp_path / "head"), acc(tmp_path / "g")
    # most of the gain over the base body (with the fine-tuned head) comes back with 10% of the layer parameters
    assert a_ft - a_head > 0.1, (a_ft, a_head)
    assert a_graft - a_head >= 0.8 * (a_ft - a_head), (a_ft, a_head, a_graft)
