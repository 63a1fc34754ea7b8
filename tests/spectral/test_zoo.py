"""The phenomenon on a real model (zoo: all-MiniLM-L6-v2 fine-tuned on one task): LoRA r=8 has intruder
dimensions, full fine-tuning (nearly) none, and the fast path agrees with the full-SVD reference there too."""
from __future__ import annotations

import pytest

from weightops.spectral import Options, analyse

pytestmark = pytest.mark.slow  # builds zoo models on first use (minutes)


def test_lora_has_intruders_full_ft_nearly_none(tmp_path):
    zoo = pytest.importorskip("weightops.zoo")
    base = zoo.get("base", fast=True)
    lora, full = zoo.get("sentiment-lora-r8", fast=True), zoo.get("sentiment-ft-lr1e-4-s0", fast=True)
    merged = zoo.get("sentiment-lora-r8-merged", fast=True)
    fast = analyse(str(base), [str(lora), str(full), str(merged)], opts=Options(cache_dir=str(tmp_path)), quiet=True)
    exact = analyse(str(base), [str(lora), str(full), str(merged)], opts=Options(solver="exact", cache_dir=None), quiet=True)
    t_lora, t_full, t_merged = fast["targets"]
    assert t_lora["solvers"] == {"lowrank": 36} and "subspace" in t_full["solvers"]
    assert t_merged["counts_vs_eps"] == t_lora["counts_vs_eps"]  # the adapter is analysed as its merged model
    assert t_lora["n_matrices"] == t_full["n_matrices"] == 36  # 6 layers × (q, k, v, o, up, down)
    assert t_lora["total"] > 2 * max(t_full["total"], 1)
    assert [t["counts_vs_eps"] for t in fast["targets"]] == [t["counts_vs_eps"] for t in exact["targets"]]
