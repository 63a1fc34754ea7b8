"""Learned graft masks (Panigrahi et al. 2023, `graft_trainer.py`).

    γ(S) = γbase + (1 − 2γbase)·σ(S − b),   θ(S) = θ0 + γ(S)⊙δ  on the eligible tensors

γbase is the data-free top-|δ| mask (weightops.sparse.graft), S ~ U[0, 1)
(seeded), b = 10. Each step is one full-batch gradient step on S with the
model frozen: the task loss is averaged over every training batch, its
gradient w.r.t. θ is accumulated, and S ← S − lr·∂L/∂S with
∂L/∂S = ∂L/∂θ ⊙ δ ⊙ (1 − 2γbase) ⊙ σ'(S − b) (the paper's manual update; lr
1e7 because σ'(−10) ≈ 4.5e-5). Every `eval_every` steps the mask is
binarised and scored (train + dev accuracy, the paper's rule; or an
evaluator from weightops.evaluate) and the best S is kept (strictly better).

Binarisation: `topk` (default, ours: the issue asks for the target sparsity)
keeps exactly k elements with the largest γ(S), ties by position as in the
data-free graft; `round` is the paper's round(γ) = γbase XOR (S > b), whose
size can drift from k. Learning holds the model in memory (it trains);
reading and writing stay streaming.

The task: "zoo:<task>[:<limit>]" (train split to learn, validation to select),
"seqcls:<train.csv|.jsonl>?dev=<file>&max_length=..&tokenizer=..", or
"module:function" / "file.py:function" returning a `GraftTask`.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from weightops.errors import WeightopsError, check_finite


def _hf_loss(output, batch) -> torch.Tensor:
    return output.loss


def _hf_correct(output, batch) -> tuple[int, int]:
    y = batch["labels"]
    return int((output.logits.argmax(-1) == y).sum()), int(y.numel())


@dataclass
class GraftTask:
    """Data and objective for learning a mask.

    train / dev: lists of batches, each a dict of tensors passed as keyword
    arguments to the model (HF style, "labels" included); loss(output, batch)
    is the MEAN loss of the batch; correct(output, batch) -> (n correct, n).
    load_model(dir) builds the frozen model from the base directory (default:
    transformers' AutoModelForSequenceClassification).
    """

    train: list
    dev: list
    loss: Callable[[Any, dict], torch.Tensor] = _hf_loss
    correct: Callable[[Any, dict], tuple[int, int]] = _hf_correct
    load_model: Callable[[Path], torch.nn.Module] | None = None
    info: dict = field(default_factory=dict)


def seqcls_task(train_rows, dev_rows, tokenizer_dir, *, max_length: int = 128, batch_size: int = 32,
                info: dict | None = None) -> GraftTask:
    """The ready-made task: sequence classification on (text, label) rows with the model's own CE loss."""
    from transformers import AutoTokenizer

    from weightops.evaluate import _label_ids

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    class _Cfg:  # integer labels pass through; names need the model's label2id (not known yet)
        label2id = None

    def batches(rows):
        out = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            enc = tok([r[0] for r in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            enc = dict(enc)
            enc["labels"] = torch.tensor(_label_ids([r[1] for r in chunk], _Cfg))
            out.append(enc)
        return out

    if not train_rows or not dev_rows:
        raise WeightopsError("the task needs non-empty train and dev data")
    return GraftTask(batches(train_rows), batches(dev_rows), info=info or {})


def resolve_task(spec, base_dir: Path, *, batch_size: int = 32, limit: int | None = None) -> GraftTask:
    """A GraftTask from a spec string (see the module docstring) or a GraftTask itself."""
    if isinstance(spec, GraftTask):
        return spec
    if not isinstance(spec, str):
        raise WeightopsError(f"--task must be a string, got {type(spec).__name__}")
    if spec.startswith("zoo:"):
        from weightops.zoo.tasks import TASKS, load_task
        from weightops.zoo.train import MAX_LEN

        name, _, lim = spec[4:].partition(":")
        if name not in TASKS:
            raise WeightopsError(f"unknown zoo task '{name}'; tasks are {', '.join(TASKS)}")
        n = int(lim) if lim else limit
        data = load_task(name)
        return seqcls_task(data["train"][:n], data["validation"][:n], base_dir, max_length=MAX_LEN,
                           batch_size=batch_size, info={"task": spec, "train": len(data["train"][:n]),
                                                        "dev": len(data["validation"][:n])})
    if spec.startswith("seqcls:"):
        from weightops.evaluate import _options, read_labelled

        target, opts = _options(spec[7:])
        if "dev" not in opts:
            raise WeightopsError("--task seqcls:<train file> needs ?dev=<file> (the data the best mask is chosen on)")
        train, dev = read_labelled(target)[:limit], read_labelled(opts["dev"])[:limit]
        return seqcls_task(train, dev, opts.get("tokenizer") or base_dir, max_length=int(opts.get("max_length", 128)),
                           batch_size=batch_size, info={"task": spec, "train": len(train), "dev": len(dev)})
    from weightops.evaluate import _python

    if ":" not in spec:
        raise WeightopsError(f"--task must be zoo:<task>, seqcls:<file>?dev=<file> or module:function, got {spec!r}")
    fn, _ = _python(*spec.rsplit(":", 1))
    task = fn()
    if not isinstance(task, GraftTask):
        raise WeightopsError(f"--task {spec}: the function must return a weightops.sparse.learn.GraftTask")
    return task


def _dense_mask(path, names, shapes) -> dict[str, torch.Tensor]:
    from weightops.sparse.format import open_sparse

    f = open_sparse(path)
    out = {}
    for n in names:
        m = torch.zeros(shapes[n], dtype=torch.bool).flatten()
        m[f.indices(n)] = True
        out[n] = m.reshape(shapes[n])
    f.close()
    return out


def _binarize(soft: dict[str, torch.Tensor], names: list[str], k: int) -> dict[str, torch.Tensor]:
    """Exactly k largest soft values (ties by position), via the same exact threshold as the data-free graft."""
    from weightops.ops import kth_largest_abs

    if k == 0:
        return {n: torch.zeros_like(soft[n], dtype=torch.bool) for n in names}
    ((t, above),) = kth_largest_abs(lambda: ((soft[n].flatten(), None) for n in names), [k], with_counts=True)
    ties = k - above
    out = {}
    for n in names:
        v = soft[n].flatten()
        keep = v > t
        if ties > 0:
            tie = (v == t).nonzero().flatten()[:ties]
            keep[tie] = True
            ties -= tie.numel()
        out[n] = keep.reshape(soft[n].shape)
    return out


def learn_mask(base, finetuned, task, *, sparsity: float | None = None, k: int | None = None, scope: str | None = None,
               whole: str | None = None, out=None, mask_out=None, steps: int = 100, lr: float = 1e7,
               sigmoid_bias: float = 10.0, batch_size: int = 32, limit: int | None = None, eval_every: int = 10,
               seed: int = 0, binarize: str = "topk", evaluator=None, force: bool = False, quiet: bool = True,
               command=None, threads: int | None = None) -> dict:
    """Learn a graft mask on task data; write the mask (`mask_out`) and/or the grafted model (`out`).

    Returns {"nnz", "best_step", "best_train", "best_dev", "losses" (per step, soft mask), "scores", ...}.
    """
    check_finite(sparsity=sparsity, lr=lr, sigmoid_bias=sigmoid_bias)
    from torch.func import functional_call

    from weightops.io.checkpoint import Checkpoint
    from weightops.sparse.apply import apply_mask
    from weightops.sparse.format import SparseWriter
    from weightops.sparse.graft import (_open_pair, graft_method_manifest, select_top_delta, sources_manifest,
                                        write_selection)

    if out is None and mask_out is None:
        raise WeightopsError("nothing to write: give --out (grafted model) and/or --mask-out")
    for p in (out, mask_out):
        if p is not None and Path(p).exists() and not force:
            raise WeightopsError(f"{p} exists; pass --force to replace it")
    if binarize not in ("topk", "round"):
        raise WeightopsError(f"binarize must be topk or round, got {binarize}")
    if steps < 0 or eval_every < 1:
        raise WeightopsError("--steps must be >= 0 and --eval-every >= 1")
    if threads:
        torch.set_num_threads(int(threads))
    base_dir = Path(base)
    if not (base_dir / "config.json").is_file():
        raise WeightopsError(f"{base}: learning a mask needs a model directory with config.json (to build the model)")
    base_src, ft_src = _open_pair(base, finetuned)
    sel = select_top_delta(base_src, ft_src, sparsity=sparsity, k=k, scope=scope, whole=whole, quiet=quiet)
    t = resolve_task(task, base_dir, batch_size=batch_size, limit=limit)
    scratch = Path(tempfile.mkdtemp(prefix=".learn-mask-"))
    try:
        write_selection(scratch / "init", base_src, ft_src, sel, quiet=True)
        names = sel.eligible
        shapes = {n: tuple(base_src.infos[n].shape) for n in names}
        gb = {n: m.float() for n, m in _dense_mask(scratch / "init", names, shapes).items()}
        theta0 = {n: v.float() for n, v in base_src.load(names).items()}
        delta = {n: v.float() - theta0[n] for n, v in ft_src.load(names).items()}

        if t.load_model is not None:
            model = t.load_model(base_dir)
        else:
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(base_dir)
        model.eval()
        params = dict(model.named_parameters())
        missing = [n for n in names + sel.whole if n not in params]
        if missing:
            raise WeightopsError(f"the model built from {base} has no parameter '{missing[0]}' (checkpoint names must match "
                                 f"the model's; use --scope to restrict)")
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            for n, v in ft_src.load(sel.whole).items():
                params[n].copy_(v.to(params[n].dtype))
        dtype = next(iter(params.values())).dtype

        g = torch.Generator().manual_seed(seed)
        S = {n: torch.rand(shapes[n], generator=g) for n in names}

        def soft(n):
            return gb[n] + (1 - 2 * gb[n]) * torch.sigmoid(S[n] - sigmoid_bias)

        def binary():
            if binarize == "round":
                return {n: (gb[n] > 0.5) ^ (S[n] > sigmoid_bias) for n in names}
            return _binarize({n: soft(n) for n in names}, names, sel.k)

        n_train = sum(int(b["labels"].numel()) if "labels" in b else 1 for b in t.train)

        def accuracy(batches, theta) -> float:
            c = tot = 0
            with torch.no_grad():
                for b in batches:
                    o = functional_call(model, theta, args=(), kwargs=b)
                    ci, ti = t.correct(o, b)
                    c, tot = c + ci, tot + ti
            return c / tot if tot else 0.0

        def score(mask) -> tuple[float, float, float]:
            theta = {n: (theta0[n] + mask[n].float() * delta[n]).to(dtype) for n in names}
            if evaluator is not None:
                from weightops.evaluate import evaluate_state

                state = {k_: v.detach() for k_, v in model.state_dict().items()}
                state.update(theta)
                s = evaluate_state(state, base_dir, evaluator)
                return s, float("nan"), s
            tr, dv = accuracy(t.train, theta), accuracy(t.dev, theta)
            return tr + dv, tr, dv

        from tqdm.auto import tqdm

        losses, scores = [], []
        best = (-math.inf, None, None, None, None)  # score, step, train, dev, S
        bar = tqdm(total=steps, desc="graft: learn mask", disable=quiet, delay=1.0)
        for step in range(steps + 1):
            if step % eval_every == 0 or step == steps:
                sc, tr, dv = score(binary())
                scores.append({"step": step, "score": sc, "train": tr, "dev": dv})
                if sc > best[0]:
                    best = (sc, step, tr, dv, {n: s.clone() for n, s in S.items()})
            if step == steps:
                break
            theta = {n: (theta0[n] + soft(n) * delta[n]).to(dtype).requires_grad_() for n in names}
            total = 0.0
            for b in t.train:
                o = functional_call(model, theta, args=(), kwargs=b)
                w = (int(b["labels"].numel()) if "labels" in b else 1) / n_train
                loss = t.loss(o, b) * w
                loss.backward()
                total += float(loss.detach())
            losses.append(total)
            with torch.no_grad():
                for n in names:
                    sg = torch.sigmoid(S[n] - sigmoid_bias)
                    S[n] -= lr * theta[n].grad.float() * delta[n] * (1 - 2 * gb[n]) * sg * (1 - sg)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
        bar.close()
        S = best[4]
        final = binary()

        method = graft_method_manifest(sel, sparsity, scope, whole)
        method.update({"name": "graft-learned", "init": "graft-top-delta", "steps": steps, "lr": lr,
                       "sigmoid_bias": sigmoid_bias, "seed": seed, "binarize": binarize, "eval_every": eval_every,
                       "best_step": best[1], "best_score": best[0], "best_train": best[2], "best_dev": best[3],
                       "selection": "evaluator" if evaluator is not None else "train accuracy + dev accuracy",
                       "task": t.info, "losses": losses, "scores": scores})
        manifest = {"method": method, "sources": sources_manifest(base_src, [("finetuned", ft_src)])}
        mpath = Path(mask_out) if mask_out is not None else scratch / "learned"
        with SparseWriter(mpath, "mask", manifest, force=force) as w:
            for n in sel.whole:
                w.write_tensor(n, base_src.infos[n].shape, base_src.infos[n].dtype, None)
            for n in names:
                w.write_tensor(n, shapes[n], base_src.infos[n].dtype, final[n].flatten().nonzero().flatten())
            w.commit()
        result = {"nnz": sum(int(final[n].sum()) for n in names) + sum(base_src.infos[n].numel for n in sel.whole),
                  "best_step": best[1], "best_train": best[2], "best_dev": best[3], "losses": losses, "scores": scores,
                  "changed_from_init": sum(int((final[n] != (gb[n] > 0.5)).sum()) for n in names),
                  "mask": str(mask_out) if mask_out is not None else None}
        if out is not None:
            res = apply_mask(base, finetuned, mpath, out, force=force, quiet=quiet, command=command,
                             manifest_extra={"graft": {k_: v for k_, v in method.items() if k_ != "losses"}})
            result["model"] = str(res.out)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        base_src.close()
        if isinstance(ft_src, Checkpoint):
            ft_src.close()
