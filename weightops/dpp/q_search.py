"""Choosing the DAREx-q divisor q (or the analytic η) by a 1-D search.

Searches MAXIMISE `score(x)`; proxies are losses, so they are passed negated.
- `grid_search`: the reference's two-stage grid (DAREx find_optimal_param):
  a coarse grid from lo with early stop after `patience` non-improvements in a
  row (ties count as improvements), then a grid `decay` times finer around the
  best, same stop rule; the answer is the best of every point evaluated (on a
  tie, the one evaluated first). Ours: grids are built from integer multiples
  (no np.arange drift) and clipped to [lo, hi] (the reference's second stage
  can step past its upper bound, e.g. to q > 1).
- `bounded_search`: Brent's bounded method (scipy) on [lo, hi] plus both end
  points; fewer evaluations when the score is unimodal.
- `log_grid_search` (ours): the same two stages on a geometric grid. q's scale
  is 1 − p (the drop rate's keep fraction), and at high p the best q can sit in
  a narrow peak just above it that a linear coarse step of (hi − lo)/10 jumps
  over; geometric points are as dense near lo, relatively, as near hi.
Proxies (`HiddenStateProxy`, `TopKLogitProxy`) compare a pruned model with the
fine-tuned one on unlabelled inputs, computed with `transformers`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from weightops.errors import WeightopsError


@dataclass
class SearchResult:
    x: float
    score: float
    evaluated: list[tuple[float, float]] = field(default_factory=list)
    how: str = ""

    def as_dict(self) -> dict:
        return {"value": round(self.x, 6), "score": self.score, "search": self.how,
                "evaluated": [[round(a, 6), b] for a, b in self.evaluated]}


def _grid(lo: float, hi: float, step: float) -> list[float]:
    n = int(math.floor((hi - lo) / step + 1e-9))
    return [round(lo + i * step, 10) for i in range(n + 1)]


def _check_bounds(lo: float, hi: float, step: float | None = None) -> None:
    if not (lo <= hi) or math.isnan(lo) or math.isnan(hi):
        raise WeightopsError(f"search bounds must satisfy lo <= hi, got [{lo:g}, {hi:g}]")
    if step is not None and not step > 0:
        raise WeightopsError(f"search step must be > 0, got {step:g}")


def _scan(score, points, seen: dict[float, float], evaluated: list, patience: int | None) -> None:
    """Score `points` in order, each x once across stages (`seen`, `evaluated` grow); stop after
    `patience` non-improvements in a row (ties count as improvements), or never when None."""
    best, bad = -math.inf, 0
    for x in points:
        if x not in seen:
            seen[x] = float(score(x))
            evaluated.append((x, seen[x]))
        if seen[x] >= best:
            best, bad = seen[x], 0
        else:
            bad += 1
        if patience is not None and bad >= patience:
            break


def grid_search(score: Callable[[float], float], lo: float, hi: float, step: float, *,
                decay: float = 0.1, patience: int = 4) -> SearchResult:
    _check_bounds(lo, hi, step)
    if not 0 < decay <= 1:
        raise WeightopsError(f"decay must be in (0, 1], got {decay:g}")
    evaluated: list[tuple[float, float]] = []
    seen: dict[float, float] = {}
    _scan(score, _grid(lo, hi, step), seen, evaluated, patience)
    x1 = max(evaluated, key=lambda t: t[1])[0]
    lo2 = max(lo + step * decay, x1 - step * (1 - decay))
    hi2 = min(hi, x1 + step - step * decay * 1e-6)
    if lo2 <= hi2 and decay < 1:
        _scan(score, _grid(lo2, hi2, step * decay), seen, evaluated, patience)
    bx, bs = max(evaluated, key=lambda t: t[1])  # max() keeps the first of equals
    return SearchResult(bx, bs, evaluated, f"grid(lo={lo:g}, hi={hi:g}, step={step:g}, decay={decay:g})")


def _geomgrid(lo: float, hi: float, per_decade: float) -> list[float]:
    n = max(1, math.ceil(math.log10(hi / lo) * per_decade - 1e-9)) if hi > lo else 0
    return [lo * (hi / lo) ** (i / n) for i in range(n)] + [hi] if n else [lo]


def log_grid_search(score: Callable[[float], float], lo: float, hi: float, *, per_decade: int = 5,
                    refine: int = 4, patience: int = 4) -> SearchResult:
    """Geometric coarse grid (`per_decade` points per factor 10, early stop after `patience`
    non-improvements, ties count as improvements), then `refine` geometric points inside each
    coarse interval next to the best; the best of every point evaluated (first on ties)."""
    _check_bounds(lo, hi)
    if not lo > 0:
        raise WeightopsError(f"--q-search log needs lo > 0, got {lo:g}")
    evaluated: list[tuple[float, float]] = []
    seen: dict[float, float] = {}
    coarse = _geomgrid(lo, hi, per_decade)
    _scan(score, coarse, seen, evaluated, patience)
    i = coarse.index(max(evaluated, key=lambda t: t[1])[0])
    fine = []
    for j in (i - 1, i):  # the coarse intervals on either side of the best point
        if 0 <= j and j + 1 < len(coarse):
            a, b = coarse[j], coarse[j + 1]
            fine += [a * (b / a) ** (k / (refine + 1)) for k in range(1, refine + 1)]
    _scan(score, sorted(fine), seen, evaluated, None)
    bx, bs = max(evaluated, key=lambda t: t[1])
    return SearchResult(bx, bs, evaluated, f"log(lo={lo:g}, hi={hi:g}, per_decade={per_decade}, refine={refine})")


def bounded_search(score: Callable[[float], float], lo: float, hi: float, *, xtol: float = 1e-3,
                   maxiter: int = 40) -> SearchResult:
    from scipy.optimize import minimize_scalar

    _check_bounds(lo, hi)
    evaluated: list[tuple[float, float]] = []

    def f(x):
        s = float(score(float(x)))
        evaluated.append((float(x), s))
        return -s

    f(hi)
    if hi > lo:
        f(lo)
        minimize_scalar(f, bounds=(lo, hi), method="bounded", options={"xatol": xtol, "maxiter": maxiter})
    bx, bs = max(evaluated, key=lambda t: t[1])
    return SearchResult(bx, bs, evaluated, f"bounded(lo={lo:g}, hi={hi:g}, xtol={xtol:g})")


def search(score, lo, hi, *, how: str = "grid", step: float | None = None, decay: float = 0.1,
           xtol: float = 1e-3) -> SearchResult:
    if how == "grid":
        return grid_search(score, lo, hi, step if step is not None else (hi - lo) / 10 or 1.0, decay=decay)
    if how == "bounded":
        return bounded_search(score, lo, hi, xtol=xtol)
    if how == "log":
        return log_grid_search(score, lo, hi)
    raise WeightopsError(f"--q-search must be grid, log or bounded, got {how}")


# -- unlabelled proxies -------------------------------------------------------------------

def read_texts(spec) -> list[str]:
    """Unlabelled inputs: a list of strings, a text file (one input per line) or zoo:<task>[:<split>]."""
    from pathlib import Path

    if isinstance(spec, (list, tuple)):
        texts = [str(t) for t in spec]
    elif isinstance(spec, str) and spec.startswith("zoo:"):
        from weightops.zoo.tasks import load_task

        parts = spec.split(":")
        data = load_task(parts[1])[parts[2] if len(parts) > 2 else "train"]
        texts = [t for t, _ in data]
    else:
        p = Path(str(spec))
        if not p.is_file():
            raise WeightopsError(f"data file {spec} not found (give a text file with one input per line, or zoo:<task>)")
        texts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not texts:
        raise WeightopsError(f"no inputs in {spec}")
    return texts


def is_decoder(model_dir) -> bool:
    """A causal LM: its architecture is one transformers loads with AutoModelForCausalLM (GPT2LMHeadModel,
    *ForCausalLM, ...), or its config says is_decoder."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = AutoConfig.from_pretrained(model_dir)
    archs = getattr(cfg, "architectures", None) or []
    causal = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)}
    return bool(getattr(cfg, "is_decoder", False)) or any(a in causal or a.endswith("ForCausalLM") for a in archs)


def load_for_proxy(model_dir, decoder: bool):
    from transformers import AutoModel, AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    cls = AutoModelForCausalLM if decoder else AutoModel
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a task head left out of AutoModel is expected, not news
    try:
        model = cls.from_pretrained(model_dir, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(level)
    model.eval()
    return model


def tokenize(model_dir, texts: list[str], max_len: int):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")


class _Proxy:
    batch_size = 32

    def __init__(self, model, batch):
        self.model, self.batch = model, batch
        self.mask = batch["attention_mask"].bool()
        self.ref = self._features()

    @torch.no_grad()
    def _features(self) -> list[torch.Tensor]:
        out = []
        n = self.batch["input_ids"].shape[0]
        for i in range(0, n, self.batch_size):
            part = {k: v[i:i + self.batch_size] for k, v in self.batch.items()}
            out.append(self._forward(part))
        return out


class HiddenStateProxy(_Proxy):
    """Encoders: mean |H_ft − H| of the last hidden state over real (non-pad) tokens (DAREx encoder proxy,
    with an attention mask; the reference feeds unpadded 128-token windows)."""

    name = "hidden"

    def _forward(self, part):
        return self.model(**part).last_hidden_state.float()

    def __call__(self) -> float:
        tot, cnt = 0.0, 0
        for i, (h0, h) in enumerate(zip(self.ref, self._features())):
            m = self.mask[i * self.batch_size:(i + 1) * self.batch_size]
            tot += (h0 - h).abs()[m].sum().item()
            cnt += int(m.sum()) * h.shape[-1]
        return tot / max(cnt, 1)


class TopKLogitProxy(_Proxy):
    """Decoders: MSE of the logits at the fine-tuned model's top-k positions, over real tokens (DAREx
    top_k_mse_loss, K = 5)."""

    name = "top5-logits"
    k = 5

    def _forward(self, part):
        return self.model(**part).logits.float()

    def __call__(self) -> float:
        tot, cnt = 0.0, 0
        for i, (z0, z) in enumerate(zip(self.ref, self._features())):
            m = self.mask[i * self.batch_size:(i + 1) * self.batch_size]
            idx = z0.topk(self.k, dim=-1).indices
            d = (z0.gather(-1, idx) - z.gather(-1, idx))[m]
            tot += d.pow(2).sum().item()
            cnt += d.numel()
        return tot / max(cnt, 1)


def make_proxy(model, model_dir, texts: list[str], decoder: bool, max_len: int = 128) -> _Proxy:
    batch = tokenize(model_dir, texts, max_len)
    return (TopKLogitProxy if decoder else HiddenStateProxy)(model, dict(batch))
