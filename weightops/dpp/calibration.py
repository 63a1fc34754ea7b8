"""Input-activation statistics of every nn.Linear, collected with forward hooks.

For each linear weight W [out, in] (named as in the checkpoint) over the real
(non-pad) tokens of the calibration inputs, in float64:
- `mean[j]`: the SIGNED mean of input feature j (x̄_j, for the analytic q);
- `norm[j]`: WANDA's ‖X_j‖₂ = sqrt(Σ_tokens x_j² / n_sequences) (locuslab/wanda
  WrappedGPT.scaler_row; the per-sequence normalisation only scales every
  score of a tensor by the same constant).
Pad tokens are masked out (the DAREx code feeds unpadded windows, so this is
the same statistic on padded batches). The model runs whole, in fp32, on the
fine-tuned weights; it must fit in memory (WANDA's layer-by-layer
propagation for models that do not is not implemented).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from weightops.errors import WeightopsError


@dataclass
class ActivationStats:
    mean: dict[str, torch.Tensor]
    norm: dict[str, torch.Tensor]
    tokens: int
    sequences: int

    def as_dict(self) -> dict:
        return {"tensors": len(self.mean), "tokens": self.tokens, "sequences": self.sequences}


def load_model(model_dir):
    """The checkpoint's own architecture (so module names match tensor names), in fp32, eval mode."""
    import transformers
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(model_dir)
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    model = (cls or AutoModel).from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


@torch.no_grad()
def collect(model, batch, *, batch_size: int = 16, weight_names=None) -> ActivationStats:
    """Run `batch` (tokenizer output with attention_mask) through `model`; statistics per linear weight.

    `weight_names`: checkpoint tensor names; module names are mapped to them
    through `inmemory.param_map` (a base-model prefix may differ)."""
    from weightops.dpp.inmemory import param_map

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    by_param = {id(m.weight): n for n, m in linears.items()}
    names = {}
    if weight_names is not None:
        for ck, prm in param_map(model, weight_names).items():
            if id(prm) in by_param:
                names[by_param[id(prm)]] = ck
    else:
        names = {n: f"{n}.weight" for n in linears}
    if not names:
        raise WeightopsError("calibration: the model has no nn.Linear layer matching the checkpoint's tensors")
    sums = {n: torch.zeros(linears[n].in_features, dtype=torch.float64) for n in names}
    sqs = {n: torch.zeros_like(sums[n]) for n in names}
    rows = {n: 0 for n in names}  # tokens, or sequences for layers fed [batch, features] (pooler, head)
    state = {"mask": None}

    def hook(name):
        def f(_mod, inp, _out):
            x = inp[0]
            m = state["mask"]
            x = x[m] if (m is not None and x.dim() == 3 and x.shape[:2] == m.shape) else x.reshape(-1, x.shape[-1])
            x = x.double()
            sums[name] += x.sum(0)
            sqs[name] += (x * x).sum(0)
            rows[name] += x.shape[0]
        return f

    handles = [linears[n].register_forward_hook(hook(n)) for n in names]
    tokens = 0
    n_seq = batch["input_ids"].shape[0]
    if n_seq == 0:
        raise WeightopsError("calibration: no inputs")
    try:
        for i in range(0, n_seq, batch_size):
            part = {k: v[i:i + batch_size] for k, v in batch.items()}
            state["mask"] = part["attention_mask"].bool()
            tokens += int(state["mask"].sum())
            model(**part)
    finally:
        for h in handles:
            h.remove()
    mean = {ck: sums[n] / max(rows[n], 1) for n, ck in names.items()}
    norm = {ck: (sqs[n] / n_seq).sqrt() for n, ck in names.items()}
    return ActivationStats(mean, norm, tokens, n_seq)


def calibrate(model_dir, texts: list[str], *, max_len: int = 128, batch_size: int = 16, weight_names=None) -> ActivationStats:
    from weightops.dpp.q_search import tokenize

    model = load_model(model_dir)
    batch = dict(tokenize(model_dir, texts, max_len))
    return collect(model, batch, batch_size=batch_size, weight_names=weight_names)
