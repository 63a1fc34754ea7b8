"""One build step per recipe kind. Each writes its files into `out` and returns
the kind-specific part of the model card (scores, training log, notes)."""
from __future__ import annotations

import json
from pathlib import Path

from weightops.zoo.tasks import TASKS, load_task

SCORED_SPLITS = ("test", "test_shifted")


def _data(recipe: dict, task: str) -> dict:
    return load_task(task, recipe.get("sizes"))


def _tokenizer():
    from transformers import AutoTokenizer

    from weightops.zoo.runtime import pretrained_dir

    return AutoTokenizer.from_pretrained(pretrained_dir())


def _scores(model, tok, recipe: dict, tasks) -> dict:
    from weightops.zoo.evaluate import accuracy

    return {t: {s: accuracy(model, tok, _data(recipe, t)[s]) for s in SCORED_SPLITS} for t in tasks}


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=not progress)


def _load(path: Path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path)


def _save(model, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)


def build_base(recipe: dict, out: Path, root: Path, progress: bool) -> dict:
    from transformers import AutoModelForSequenceClassification

    from weightops.zoo import train as T
    from weightops.zoo.runtime import pretrained_dir

    model = AutoModelForSequenceClassification.from_pretrained(pretrained_dir(), num_labels=T.NUM_LABELS)
    T.init_head(model, recipe["seed"])
    # Fine-tuning sets this; setting it here keeps config.json identical across the whole zoo.
    model.config.problem_type = "single_label_classification"
    _save(model, out)
    tok = _tokenizer()
    card = {"notes": "pretrained all-MiniLM-L6-v2 body (pooler included) + classifier initialised from `seed`; "
                     "`scores` use that untrained head, `probes` train a head on the frozen body."}
    if recipe["hp"].get("probe"):
        card["scores"], card["probes"] = {}, {}
        for t in TASKS:
            card["scores"][t], card["probes"][t] = _probe(model, tok, _data(recipe, t))
    else:
        card["scores"] = _scores(model, tok, recipe, TASKS)
    return card


def _probe(model, tok, data: dict) -> tuple[dict, dict]:
    """(untrained-head accuracy, linear probes) on the frozen body, from one feature pass.

    Probes: on the pooler output (exactly a trained classifier head) and on the
    mean-pooled last layer (the sentence embedding all-MiniLM-L6-v2 was trained for).
    """
    import torch

    from weightops.zoo import train as T

    feats = {s: T.features(model, tok, [x for x, _ in data[s]]) for s in ("train", *SCORED_SPLITS)}
    labels = {s: torch.tensor([y for _, y in data[s]]) for s in feats}

    def acc(logits, s):
        return round((logits.argmax(-1) == labels[s]).double().mean().item(), 4)

    with torch.no_grad():
        untrained = {s: acc(model.classifier(feats[s][0]), s) for s in SCORED_SPLITS}
    out = {}
    for j, kind in enumerate(("head_on_pooler", "meanpool")):
        x = feats["train"][j]
        mu, sd = x.mean(0), x.std(0) + 1e-6  # standardising only conditions L-BFGS; the probe stays linear
        head = T.fit_probe((x - mu) / sd, labels["train"])
        with torch.no_grad():
            out[kind] = {s: acc(head((feats[s][j] - mu) / sd), s) for s in SCORED_SPLITS}
    return untrained, out


def build_ft(recipe: dict, out: Path, root: Path, progress: bool) -> dict:
    from weightops.zoo import train as T

    hp, task = recipe["hp"], recipe["task"]
    model = _load(root / recipe["parent"])
    frozen = hp.get("freeze_embeddings", False)
    if frozen:
        for p in model.bert.embeddings.parameters():
            p.requires_grad = False
    tok = _tokenizer()
    optimizer = hp.get("optimizer", "adamw")
    with _bar(hp["steps"], recipe["name"], progress) as bar:
        log = T.finetune(model, tok, _data(recipe, task)["train"], steps=hp["steps"], lr=hp["lr"],
                         batch_size=hp["batch_size"], seed=recipe["seed"], weight_decay=hp["weight_decay"],
                         warmup=hp["warmup"], tick=bar.update, optimizer=optimizer)
    _save(model, out)
    which = "every parameter but the embeddings" if frozen else "every parameter"
    return {"training": log, "scores": _scores(model, tok, recipe, [task]),
            "notes": f"full fine-tune of {which} from the parent, {'SGD' if optimizer == 'sgd' else 'AdamW'}, "
                     "linear warm-up/decay"}


def build_lora(recipe: dict, out: Path, root: Path, progress: bool) -> dict:
    import torch

    from weightops.zoo import train as T
    from weightops.zoo.runtime import require_peft

    peft = require_peft()
    hp, task = recipe["hp"], recipe["task"]
    parent = _load(root / recipe["parent"])
    # peft draws the A factors' initialisation from the global generator: seed it,
    # or the adapter depends on whatever this process built before it.
    torch.manual_seed(recipe["seed"])
    model = peft.get_peft_model(parent, T.lora_config(hp["r"], hp["alpha"], hp["rslora"]))
    tok = _tokenizer()
    with _bar(hp["steps"], recipe["name"], progress) as bar:
        log = T.finetune(model, tok, _data(recipe, task)["train"], steps=hp["steps"], lr=hp["lr"],
                         batch_size=hp["batch_size"], seed=recipe["seed"], weight_decay=hp["weight_decay"],
                         warmup=hp["warmup"], tick=bar.update)
    model.save_pretrained(out, safe_serialization=True)
    # PEFT records the parent's absolute path; the zoo name keeps the bytes independent of WEIGHTOPS_ZOO.
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = recipe["parent"]
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (out / "README.md").unlink(missing_ok=True)  # PEFT's boilerplate card, with that absolute path in it
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "training": dict(log, trainable_parameters=trainable),
        "scores": _scores(model, tok, recipe, [task]),
        "lora": {"r": hp["r"], "alpha": hp["alpha"], "rslora": hp["rslora"],
                 "scaling": T.lora_scaling(hp["r"], hp["alpha"], hp["rslora"]),
                 "scaling_rule": "alpha/sqrt(r) (rsLoRA)" if hp["rslora"] else "alpha/r",
                 "target_modules": "encoder.layer.*: attention.self.{query,key,value}, attention.output.dense, "
                                   "intermediate.dense, output.dense (not the pooler)",
                 "head": "trained in full via modules_to_save; stored in adapter_model.safetensors as "
                         "base_model.model.classifier.{weight,bias}"},
        "notes": f"PEFT adapter on zoo model {recipe['parent']!r} (load: PeftModel.from_pretrained(parent, this dir)); "
                 f"merged weights in {recipe['name']}-merged",
    }


def build_lora_merged(recipe: dict, out: Path, root: Path, progress: bool) -> dict:
    import torch

    from weightops.zoo.evaluate import load_model
    from weightops.zoo.train import encode

    task = recipe["task"]
    adapter = load_model(root / recipe["parent"])
    tok = _tokenizer()
    texts = [x for x, _ in _data(recipe, task)["test"][:256]]
    with torch.inference_mode():
        before = adapter(**encode(tok, texts)).logits
    merged = adapter.merge_and_unload()
    _save(merged, out)
    with torch.inference_mode():
        diff = (merged(**encode(tok, texts)).logits - before).abs().max().item()
    return {"scores": _scores(merged, tok, recipe, [task]),
            "merge_check": {"texts": len(texts), "max_abs_logit_diff_vs_adapter": float(f"{diff:.3g}")},
            "notes": f"{recipe['parent']!r} merged into its parent with peft merge_and_unload (W + scaling * B @ A)"}


def build_v2_base(recipe: dict, out: Path, root: Path, progress: bool) -> dict:
    from weightops.zoo import train as T

    hp = recipe["hp"]
    model = _load(root / recipe["parent"])
    tok = _tokenizer()
    pairs = T.v2_pairs(hp["pairs"], recipe["seed"])
    with _bar(hp["steps"], recipe["name"], progress) as bar:
        log = T.contrastive(model.bert, tok, pairs, steps=hp["steps"], lr=hp["lr"], batch_size=hp["batch_size"],
                            seed=recipe["seed"], temperature=hp["temperature"], tick=bar.update)
    _save(model, out)
    return {"training": log, "scores": _scores(model, tok, recipe, TASKS),
            "notes": "evolved base: the base body after a short in-batch contrastive (InfoNCE, mean pooling) run "
                     "on paraphrase pairs about places and travel; the pooler (unused by that loss) and the "
                     "classifier are the base's, so v2 fine-tunes share base's head init"}
