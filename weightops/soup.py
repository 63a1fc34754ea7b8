"""Model soups (Wortsman et al. 2022, arXiv 2203.05482): uniform, greedy and learned.

- uniform: the mean of all ingredients (`weightops merge --method linear`).
- greedy (the paper's Recipe 1): score every ingredient on held-out data, sort
  by score (descending, ties in input order), start from the best, and add the
  next ingredient if the uniform average of the soup plus it scores no worse
  (`accept="ge"`, the paper's ≥; the paper's code uses a strict >, our
  `accept="gt"`). Every candidate tried is scored, printed and saved in
  soup.json next to the weights.
- learned (the paper's "learned soup", optional there): mixing weights
  softmax(β), one β per model (or per model and layer group with
  `per_layer=True`), trained by Adam on the cross-entropy of held-out labelled
  data (a zoo: or seqcls: spec), starting from the uniform soup. The softmax
  parametrisation and the optimiser are ours; the paper's code optimises raw
  coefficients with a temperature. This needs every ingredient in memory
  (fp32), so it is meant for models that fit; uniform and greedy stream.

Candidates are written to scratch directories by the streaming engine, scored
through `weightops.evaluate` (so scores are cached by content) and deleted.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from weightops.errors import WeightopsError, check_finite
from weightops.methods.base import Method

SOUP_METHODS = ("uniform", "greedy", "learned")


@dataclass
class SoupResult:
    out: Path
    method: str
    ingredients: list[str]
    weights: list[float] | dict[str, list[float]]
    score: float | None
    log: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"out": str(self.out), "method": self.method, "ingredients": self.ingredients, "weights": self.weights,
                "score": self.score, "log": self.log, "seconds": round(self.seconds, 3)}


class GroupWeighted(Method):
    """Σ w_g,i θi with weights per layer group (a per-layer learned soup)."""

    name = "soup_per_layer"
    summary = "weighted average of models with one weight vector per layer group"
    needs_base = False

    def __init__(self, weights: dict[str, list[float]], group_by: str = "layer"):
        self.weights, self.group_by = weights, group_by

    def prepare(self, job, p, model_state):
        from weightops.interpolate import layer_group

        return self.weights[layer_group(job.name, self.group_by)]

    def merge_block(self, job, p, state, start, base, models):
        import torch

        from weightops import ops

        return ops.weighted_sum(models, state, out_dtype=torch.float32)


def write_average(models, weights, out, *, group_by: str = "layer", quiet: bool = True, manifest_extra=None,
                  extra_json=None, **engine_kw):
    """Σ wi θi / Σ wi into `out` (weights: a list, or {group: list} for per-group weights)."""
    from weightops.engine import run_streaming
    from weightops.io.checkpoint import Checkpoint
    from weightops.methods import MergeParams, get_method

    sources = [Checkpoint(m) for m in models]
    if isinstance(weights, dict):
        method, params = GroupWeighted(weights, group_by), None
    else:
        method = get_method("linear")
        params = method.resolve(MergeParams(weights=list(weights)), len(sources))
    return run_streaming(method, params, None, sources, out=out, quiet=quiet, manifest_extra=manifest_extra,
                         extra_json=extra_json, **engine_kw)


def soup(models, *, out, method: str = "uniform", evaluator=None, accept: str = "ge", workers: int = 1,
         learn_on: str | None = None, per_layer: bool = False, group_by: str = "layer", steps: int = 60,
         lr: float = 0.1, batch_size: int = 32, seed: int = 0, cache_dir=None, cache: bool = True, quiet: bool = False,
         echo=None, command=None, **engine_kw) -> SoupResult:
    """Make a soup of `models` into `out`; see the module docstring. `echo(str)` receives progress lines."""
    check_finite(lr=lr)
    from weightops.evaluate import evaluate_many, make_evaluator, scratch_dir

    t0 = time.perf_counter()
    say = echo or (lambda s: None)
    models = [str(m) for m in models]
    if method not in SOUP_METHODS:
        raise WeightopsError(f"--method must be one of {', '.join(SOUP_METHODS)}, got {method}")
    if not models:
        raise WeightopsError("give at least one model")
    if accept not in ("ge", "gt"):
        raise WeightopsError(f"--accept must be ge (no worse, the paper) or gt (strictly better, the paper's code), got {accept}")
    if method in ("greedy", "learned") and evaluator is None:
        raise WeightopsError(f"--method {method} needs --eval (held-out data, never the test set)")
    ev = make_evaluator(evaluator, cache_dir=cache_dir, cache=cache) if evaluator is not None else None
    log: list[dict] = []
    extra = {"command": command}

    if method == "uniform":
        weights: list[float] | dict = [1.0 / len(models)] * len(models)
        kept = models
    elif method == "greedy":
        scores = evaluate_many(ev, models, workers=workers)
        for m, s in zip(models, scores):
            log.append({"step": "ingredient", "model": m, "score": s})
            say(f"ingredient {m}: {s:.6g}")
        order = sorted(range(len(models)), key=lambda i: (-scores[i], i))
        kept, best = [models[order[0]]], scores[order[0]]
        log.append({"step": "start", "soup": list(kept), "score": best})
        say(f"start from {kept[0]}: {best:.6g}")
        for i in order[1:]:
            cand = kept + [models[i]]
            with scratch_dir() as d:
                c = write_average(cand, [1.0] * len(cand), d / "soup", **engine_kw).out
                s = ev(c)
            ok = s >= best if accept == "ge" else s > best
            log.append({"step": "candidate", "add": models[i], "soup": cand, "score": s, "best_so_far": best,
                        "accepted": ok})
            say(f"{'add ' if ok else 'skip'} {models[i]}: soup of {len(cand)} scores {s:.6g} "
                f"({'>=' if accept == 'ge' else '>'} {best:.6g}: {'yes' if ok else 'no'})")
            if ok:
                kept, best = cand, s
        weights = [1.0 / len(kept)] * len(kept)
    else:
        kept = models
        weights, train_log = learn_weights(models, learn_on or evaluator, per_layer=per_layer, group_by=group_by,
                                           steps=steps, lr=lr, batch_size=batch_size, seed=seed, quiet=quiet)
        log.extend(train_log)
        extra.update(steps=steps, lr=lr, batch_size=batch_size, seed=seed, per_layer=per_layer,
                     learn_on=str(learn_on or evaluator))
    # Uniform and greedy soups use the candidates' exact weights, so the final soup's bytes (and
    # hence its cached score) are those of the last accepted candidate.
    res = write_average(kept, [1.0] * len(kept) if method != "learned" else weights, out, group_by=group_by, quiet=quiet, command=command,
                        manifest_extra={"soup": {"method": method, "ingredients": kept, "accept": accept}},
                        **engine_kw)
    score = ev(res.out) if ev is not None else None
    if score is not None:
        log.append({"step": "final", "soup": kept, "score": score})
        say(f"{method} soup of {len(kept)}/{len(models)} ingredient(s): {score:.6g}")
    result = SoupResult(Path(out), method, kept, weights, score, log, time.perf_counter() - t0)
    _add_json(Path(out), "soup.json", {**result.as_dict(), **extra,
                                       "evaluator": getattr(ev, "name", None),
                                       "evaluations": {"computed": ev.calls, "cached": ev.hits} if ev else None})
    return result


def _add_json(d: Path, name: str, obj) -> None:
    """A report file next to finished weights (written to a temp name, then renamed)."""
    import json
    import os

    tmp = d / f".{name}.tmp"
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, d / name)


# --- learned soups -------------------------------------------------------------------------------
def _param_names(model, ckpt_names) -> dict[str, str]:
    """checkpoint tensor name -> the model's state_dict name (HF adds or drops a base-model prefix)."""
    own = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    out, missing = {}, []
    for k in ckpt_names:
        for cand in (k, f"{prefix}.{k}", k[len(prefix) + 1:] if k.startswith(prefix + ".") else None):
            if cand in own:
                out[k] = cand
                break
        else:
            missing.append(k)
    if missing:
        raise WeightopsError(f"learned soup: {len(missing)} checkpoint tensor(s) are not in the model class, e.g. '{missing[0]}'")
    return out


def learn_weights(models, data_spec, *, per_layer=False, group_by="layer", steps=60, lr=0.1, batch_size=32,
                  seed=0, quiet=False):
    """softmax(β) mixing weights minimising held-out cross-entropy; returns (weights, log)."""
    import torch
    from torch.func import functional_call
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from weightops.evaluate import _label_ids, supervised_data
    from weightops.interpolate import groups_of
    from weightops.io.checkpoint import Checkpoint

    if not isinstance(data_spec, str):
        raise WeightopsError("--method learned needs --learn-on (or --eval) as a zoo: or seqcls: spec")
    rows, tok_dir, max_len = supervised_data(data_spec)
    model = AutoModelForSequenceClassification.from_pretrained(models[0]).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(tok_dir or models[0])
    y_all = torch.tensor(_label_ids([r[1] for r in rows], model.config))
    states = []
    for m in models:
        c = Checkpoint(m)
        states.append({k: v.float() for k, v in c.load([n for n, i in c.infos.items() if i.is_float]).items()})
        c.close()
    names = list(states[0])
    for i, s in enumerate(states[1:], 2):
        if set(s) != set(names):
            raise WeightopsError(f"learned soup: model {i} has other tensors than model 1")
    mapping = _param_names(model, names)
    groups = list(groups_of(names, group_by)) if per_layer else ["all"]
    gidx = {}
    if per_layer:
        for gi, (g, ns) in enumerate(groups_of(names, group_by).items()):
            gidx.update({n: gi for n in ns})
    else:
        gidx = {n: 0 for n in names}
    stacked = {n: torch.stack([s[n] for s in states]) for n in names}
    del states
    beta = torch.zeros(len(groups), len(models), requires_grad=True)
    opt = torch.optim.Adam([beta], lr=lr)
    g = torch.Generator().manual_seed(seed)
    log = []
    enc_all = tok([r[0] for r in rows], padding=True, truncation=True, max_length=max_len, return_tensors="pt")

    def mixed(w):
        out = {}
        for n, x in stacked.items():
            ww = w[gidx[n]].reshape(-1, *([1] * (x.dim() - 1)))
            out[mapping[n]] = (ww * x).sum(0)
        return out

    with tqdm(range(steps), desc="learned soup", disable=quiet) as bar:
        for step in bar:
            idx = torch.randperm(len(rows), generator=g)[:batch_size]
            batch = {k: v[idx] for k, v in enc_all.items()}
            logits = functional_call(model, mixed(torch.softmax(beta, -1)), args=(), kwargs=batch).logits
            loss = torch.nn.functional.cross_entropy(logits, y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            log.append({"step": "train", "iter": step, "loss": loss.item()})
            bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
    w = torch.softmax(beta.detach(), -1).double()
    if per_layer:
        weights = {gname: [float(x) for x in w[i]] for i, gname in enumerate(groups)}
    else:
        weights = [float(x) for x in w[0]]
    if not all(math.isfinite(x) for row in (weights.values() if per_layer else [weights]) for x in row):
        raise WeightopsError("learned soup diverged (non-finite weights); lower --lr")
    return weights, log
