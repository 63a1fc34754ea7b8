"""Training loops for the zoo: full fine-tunes, LoRA, the v2 contrastive run, probes.

All loops draw every random number (batch order, dropout, initialisation) from
generators seeded by the recipe's seed, so a run under `runtime.deterministic`
reproduces bit for bit on the same machine type and thread count.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import torch

MAX_LEN = 64
NUM_LABELS = 2
# The task label is the classifier's; everything else in the checkpoint is "body".
HEAD_PREFIX = "classifier."


def encode(tokenizer, texts: Sequence[str]):
    return tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """`steps` index batches: epochs of a seeded permutation, the tail carried into the next epoch."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(n, generator=g).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def _optimizer(model, lr: float, weight_decay: float, steps: int, warmup: float, optimizer: str = "adamw"):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Plain SGD moves each weight in proportion to its gradient, so the change
    # concentrates on few weights; AdamW's normalised steps spread it evenly.
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    n_warm = max(1, int(warmup * steps))

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0
        if step < n_warm:
            return (step + 1) / n_warm
        return max(0.0, (steps - step) / max(1, steps - n_warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def _run(model, steps: int, lr: float, weight_decay: float, warmup: float, seed: int,
         loss_fn: Callable[[list[int]], torch.Tensor], n: int, batch_size: int, tick=None,
         optimizer: str = "adamw") -> dict:
    torch.manual_seed(seed)  # dropout masks
    opt, sched = _optimizer(model, lr, weight_decay, steps, warmup, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses = []
    for idx in _batches(n, batch_size, steps, seed):
        loss = loss_fn(idx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if tick:
            tick()
    model.eval()
    k = max(1, len(losses) // 10)
    return {"first_loss": round(sum(losses[:k]) / k, 4), "final_loss": round(sum(losses[-k:]) / k, 4)}


def finetune(model, tokenizer, data: Sequence[tuple[str, int]], *, steps: int, lr: float, batch_size: int,
             seed: int, weight_decay: float = 0.01, warmup: float = 0.1, tick=None, optimizer: str = "adamw") -> dict:
    """Cross-entropy training of whatever parameters of `model` require grad (all, or LoRA + head)."""
    def loss_fn(idx):
        enc = encode(tokenizer, [data[i][0] for i in idx])
        return model(**enc, labels=torch.tensor([data[i][1] for i in idx])).loss

    return _run(model, steps, lr, weight_decay, warmup, seed, loss_fn, len(data), batch_size, tick, optimizer)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def contrastive(bert, tokenizer, pairs: Sequence[tuple[str, str]], *, steps: int, lr: float, batch_size: int,
                seed: int, temperature: float = 0.05, tick=None) -> dict:
    """In-batch InfoNCE on mean-pooled embeddings (the objective all-MiniLM-L6-v2 was trained with)."""
    def loss_fn(idx):
        a = encode(tokenizer, [pairs[i][0] for i in idx])
        b = encode(tokenizer, [pairs[i][1] for i in idx])
        ea = torch.nn.functional.normalize(mean_pool(bert(**a).last_hidden_state, a["attention_mask"]), dim=-1)
        eb = torch.nn.functional.normalize(mean_pool(bert(**b).last_hidden_state, b["attention_mask"]), dim=-1)
        logits = ea @ eb.T / temperature
        target = torch.arange(len(idx))
        return (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2

    return _run(bert, steps, lr, 0.01, 0.1, seed, loss_fn, len(pairs), batch_size, tick)


def v2_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Paraphrase pairs from a domain none of the tasks uses (places, travel, weather)."""
    from weightops.zoo import words as W

    rng = random.Random(f"v2/{seed}")
    seen, out = set(), []
    while len(out) < n:
        subj = rng.choice(W.V2_SUBJ)
        a, b = rng.choice(W.V2_PRED)
        when = rng.choice(["", "usually ", "apparently ", "this year ", "as always "])
        pair = (f"{when}{subj} {a}.", f"{subj} {b}, {rng.choice(['they say', 'as usual', 'once again', 'it seems'])}.")
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


@torch.no_grad()
def features(model, tokenizer, texts: Sequence[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooler output, mean-pooled last hidden state) of a sequence-classification model's body."""
    model.eval()
    pooled, meaned = [], []
    for i in range(0, len(texts), batch_size):
        enc = encode(tokenizer, texts[i:i + batch_size])
        out = model.bert(**enc)
        pooled.append(out.pooler_output)
        meaned.append(mean_pool(out.last_hidden_state, enc["attention_mask"]))
    return torch.cat(pooled), torch.cat(meaned)


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, iters: int = 200) -> torch.nn.Linear:
    """L2-regularised logistic regression, full batch with L-BFGS (deterministic, no sampling)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], NUM_LABELS)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def init_head(model, seed: int) -> None:
    """Re-initialise the classifier from `seed` alone, so base and v2-base get the same head."""
    g = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g) * std)
        model.classifier.bias.zero_()


def lora_config(r: int, alpha: int, rslora: bool):
    from weightops.zoo.runtime import require_peft

    peft = require_peft()
    return peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, use_rslora=rslora, bias="none",
        # Attention q/k/v/output and both FFN projections of every layer; not the pooler.
        target_modules=r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
        modules_to_save=["classifier"],
    )


def lora_scaling(r: int, alpha: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r
