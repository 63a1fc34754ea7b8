"""The learned-mask loop on a toy task: frozen model, sigmoid mask, loss goes down, mask keeps its size."""
from __future__ import annotations

import pytest
import torch

from weightops.errors import WeightopsError
from weightops.io.checkpoint import Checkpoint
from weightops.sparse import open_sparse
from weightops.sparse.learn import GraftTask, learn_mask, resolve_task


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny BERT classifier, a 'fine-tune' of it, and a task whose labels are the fine-tune's predictions."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("learn")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=2)
    base = BertForSequenceClassification(cfg).eval()
    base.save_pretrained(root / "base")
    ft = BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (n, p), q in zip(ft.named_parameters(), base.parameters()):
            p.copy_(q + (0.3 * torch.randn(p.shape, generator=g) if ".layer." in n else 0))
        ft.classifier.weight.mul_(8)
    ft.save_pretrained(root / "ft")
    ids = torch.randint(1, 50, (96, 10), generator=g)
    with torch.no_grad():
        y = ft(input_ids=ids).logits.argmax(-1)
    batches = [{"input_ids": ids[i:i + 32], "labels": y[i:i + 32]} for i in range(0, 96, 32)]
    return {"base": root / "base", "ft": root / "ft", "task": GraftTask(batches[:2], batches[2:])}


def test_learned_mask_lowers_loss_and_keeps_k(tmp_path, toy):
    res = learn_mask(toy["base"], toy["ft"], toy["task"], k=300, whole="^classifier\\.", steps=8, lr=3e8,
                     eval_every=4, mask_out=tmp_path / "m", out=tmp_path / "g", seed=0)
    losses = res["losses"]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    f = open_sparse(tmp_path / "m")
    n_head = sum(t.numel for n, t in f.tensors.items() if n.startswith("classifier."))
    assert f.nnz - n_head == 300  # topk binarisation: exactly k
    assert res["changed_from_init"] > 0  # the loop moved the mask away from the top-|δ| start
    assert f.manifest["method"]["name"] == "graft-learned" and [s["step"] for s in res["scores"]] == [0, 4, 8]
    # the written model is the graft with that mask
    base, ft, got = (Checkpoint(p).load() for p in (toy["base"], toy["ft"], tmp_path / "g"))
    for n in base:
        m = torch.zeros(base[n].numel(), dtype=torch.bool)
        if n in f.tensors:
            m[f.indices(n)] = True
        assert torch.equal(got[n], torch.where(m.reshape(base[n].shape), ft[n], base[n])), n
    # reproducible from the seed
    res2 = learn_mask(toy["base"], toy["ft"], toy["task"], k=300, whole="^classifier\\.", steps=8, lr=3e8,
                      eval_every=4, mask_out=tmp_path / "m2", seed=0)
    assert res2["losses"] == losses
    assert (tmp_path / "m" / "sparse.safetensors").read_bytes() == (tmp_path / "m2" / "sparse.safetensors").read_bytes()


def test_learn_bad_task(tmp_path, toy):
    with pytest.raises(WeightopsError, match="--task must be"):
        resolve_task("nonsense", toy["base"])
    with pytest.raises(WeightopsError, match="unknown zoo task"):
        resolve_task("zoo:nope", toy["base"])
    with pytest.raises(WeightopsError, match="dev="):
        resolve_task("seqcls:x.csv", toy["base"])
