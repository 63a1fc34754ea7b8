"""Accuracy of a model on a split of a zoo task (used by the cards and the examples)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from weightops.zoo.errors import ZooError


def load_model(model_dir, head_from=None):
    """A sequence-classification model from a zoo dir: full checkpoint, or PEFT adapter on its zoo parent.

    `head_from`: a checkpoint dir whose classifier replaces this model's (to
    score a merged body with one task's own head).
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    from weightops.zoo.train import HEAD_PREFIX

    model_dir = Path(model_dir)
    if (model_dir / "adapter_config.json").exists():
        model = _load_adapter(model_dir)
    elif (model_dir / "config.json").exists():
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    else:
        raise ZooError(f"{model_dir} is not a model directory (no config.json or adapter_config.json)")
    if head_from is not None:
        from safetensors.torch import load_file

        src = Path(head_from) / "model.safetensors"
        if not src.exists():
            raise ZooError(f"head_from={head_from}: no model.safetensors there (use a full or merged checkpoint)")
        head = {k[len(HEAD_PREFIX):]: v for k, v in load_file(src).items() if k.startswith(HEAD_PREFIX)}
        with torch.no_grad():
            _classifier(model).load_state_dict(head)
    model.eval()
    return model


def _classifier(model):
    if hasattr(model, "classifier"):
        return model.classifier
    return model.get_base_model().classifier.modules_to_save["default"]


def _load_adapter(adapter_dir: Path):
    from transformers import AutoModelForSequenceClassification

    from weightops.zoo.runtime import require_peft

    peft = require_peft()
    card = adapter_dir / "card.json"
    parent = json.loads(card.read_text())["parent"] if card.exists() else None
    if parent is None:
        raise ZooError(f"{adapter_dir}: adapter without a zoo card naming its base model")
    base = AutoModelForSequenceClassification.from_pretrained(adapter_dir.parent / parent)
    return peft.PeftModel.from_pretrained(base, adapter_dir)


def tokenizer_for(model_dir=None):
    from transformers import AutoTokenizer

    from weightops.zoo.runtime import pretrained_dir

    if model_dir is not None and (Path(model_dir) / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(model_dir)
    # All zoo models share MiniLM's tokenizer.
    return AutoTokenizer.from_pretrained(pretrained_dir())


def predict(model, tokenizer, texts: Sequence[str], batch_size: int = 64):
    """Predicted labels (a LongTensor) for `texts`."""
    import torch

    from weightops.zoo.train import encode

    preds = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            preds.append(model(**encode(tokenizer, texts[i:i + batch_size])).logits.argmax(-1))
    return torch.cat(preds)


def accuracy(model, tokenizer, data: Sequence[tuple[str, int]]) -> float:
    import torch

    was_training = model.training
    model.eval()  # dropout off for scoring; the caller's mode comes back below
    try:
        pred = predict(model, tokenizer, [t for t, _ in data])
    finally:
        model.train(was_training)
    return round((pred == torch.tensor([y for _, y in data])).double().mean().item(), 4)


def evaluate(model_dir_or_model, task: str, split: str = "test", head_from=None, limit: int | None = None) -> float:
    """Accuracy of a model (a zoo dir, any HF sequence-classification dir, or a loaded model) on `task`/`split`.

    `limit`: score only the first `limit` examples of the split (it is shuffled, so balanced-ish).
    """
    from weightops.zoo.runtime import deterministic
    from weightops.zoo.tasks import SPLITS, load_task

    if split not in SPLITS:
        raise ZooError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    data = load_task(task)[split][:limit]
    if isinstance(model_dir_or_model, (str, Path)):
        model = load_model(model_dir_or_model, head_from)
        tok = tokenizer_for(model_dir_or_model)
    else:
        model = model_dir_or_model
        if head_from is not None:
            raise ZooError("head_from needs a model directory, not a loaded model")
        tok = tokenizer_for(None)
    with deterministic():
        return accuracy(model, tok, data)
