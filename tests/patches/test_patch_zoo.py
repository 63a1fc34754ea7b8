"""Patches on real zoo models (all-MiniLM-L6-v2 fine-tunes): PEFT equivalence on the real naming, and the port itself."""
from __future__ import annotations

import pytest
import torch

from weightops.io.checkpoint import Checkpoint
from weightops.patches import apply_patch, check_patch, create_patch


@pytest.mark.slow  # builds the tiny zoo on a cold cache; ~80 s on a loaded 2-core machine even when cached
def test_zoo_lora_patch_on_base_is_the_peft_merged_model(tmp_path):
    """The zoo's `-merged` model is PEFT's merge_and_unload of the adapter (BertForSequenceClassification names,
    `modules_to_save` classifier): the patch applied to the adapter's base must give the same weights."""
    from weightops import zoo

    base, adapter, merged = (zoo.get(n, progress=False) for n in
                             ("tiny-base", "tiny-sentiment-lora-r8", "tiny-sentiment-lora-r8-merged"))
    r = create_patch(base, tmp_path / "p", adapter=adapter, quiet=True)
    kinds = {e["name"]: e["kind"] for e in r["entries"]}
    assert kinds["classifier.weight"] == "value" and sum(k == "lowrank" for k in kinds.values()) == 6 * 6
    apply_patch(tmp_path / "p", base, tmp_path / "out", quiet=True)
    got, want = Checkpoint(tmp_path / "out").load(), Checkpoint(merged).load()
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_ported_patch_recovers_the_task_on_v2(tmp_path):
    """PortLLM on the zoo: v2 + the v1 LoRA patch scores well above v2 alone (200 test sentences)."""
    from weightops import zoo

    v1, v2, lora = (zoo.get(n, progress=False) for n in ("base", "v2-base", "sentiment-lora-r8"))
    create_patch(v1, tmp_path / "p", adapter=lora, quiet=True)
    rep = check_patch(tmp_path / "p", v2, source=v1)
    assert rep.ok and rep.source_matches
    assert all(d["drift_norm"] > 0 for d in rep.drift if d["kind"] == "lowrank")  # v2 moved every adapted matrix
    assert all(d["drift_norm"] == 0 for d in rep.drift if d["kind"] == "value")  # and kept base's classifier
    apply_patch(tmp_path / "p", v2, tmp_path / "v2p", quiet=True)
    alone = zoo.evaluate(v2, "sentiment", "test", limit=200)
    ported = zoo.evaluate(tmp_path / "v2p", "sentiment", "test", limit=200)
    finetuned_v1 = zoo.evaluate(lora, "sentiment", "test", limit=200)
    assert ported >= alone + 0.15 and ported >= finetuned_v1 - 0.1, (alone, ported, finetuned_v1)
