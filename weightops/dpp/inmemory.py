"""Apply a pruning rule to a loaded `transformers` model, in place.

q searches score many candidates; writing each to disk would dominate. Here
each parameter is recomputed from the base and fine-tuned checkpoints by the
very `Prune` method the streaming engine runs (one block per tensor), so the
model scored is bit-identical to the one `prune` writes with the same knobs.
Memory: the loaded model plus one tensor at a time (checkpoints are mmapped).
"""
from __future__ import annotations

import torch

from weightops.dpp.rules import RULES, PruneParams
from weightops.errors import AlignmentError
from weightops.io.checkpoint import Checkpoint
from weightops.methods.base import TensorJob


def param_map(model, names) -> dict[str, torch.nn.Parameter]:
    """checkpoint tensor name -> parameter of `model` (handles a base-model prefix either side)."""
    params = dict(model.named_parameters())
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for n in names:
        for k in (n, f"{prefix}.{n}", n[len(prefix) + 1:] if prefix and n.startswith(prefix + ".") else None):
            if k is not None and k in params:
                out[n] = params[k]
                break
    return out


class PrunedModel:
    """`model` (loaded from the fine-tuned checkpoint) re-pruned on demand: `apply(rule, params)`."""

    def __init__(self, model, base: str, finetuned: str):
        self.model = model
        self.base, self.ft = Checkpoint(base), Checkpoint(finetuned)
        names = [n for n, i in self.ft.infos.items() if i.is_float and n in self.base.infos]
        self.params = param_map(model, names)
        if not self.params:
            raise AlignmentError(f"no tensor of {finetuned} matches a parameter of the loaded "
                                 f"{type(model).__name__}; is it the right architecture?")
        for n, prm in self.params.items():
            if tuple(prm.shape) != tuple(self.ft.infos[n].shape):
                raise AlignmentError(f"'{n}' is {list(prm.shape)} in the model but {list(self.ft.infos[n].shape)} on disk")

    def _job(self, name: str) -> TensorJob:
        info = self.ft.infos[name]

        def read_block(job, start, stop, which=None):
            return self.base.read(name, start, stop), [self.ft.read(name, start, stop)]
        return TensorJob(name, tuple(info.shape), self.base.infos[name].dtype, self.base, [self.ft], max(info.numel, 1), read_block)

    @torch.no_grad()
    def apply(self, rule: str, params: PruneParams) -> None:
        method = RULES[rule]
        jobs = {n: self._job(n) for n in self.params}
        state = method.prepare_model(list(jobs.values()), params)
        for n, prm in self.params.items():
            job = jobs[n]
            if job.numel == 0:
                continue
            st = method.prepare(job, params, state)
            b, xs = job.read_block(job, 0, job.numel)
            y = method.merge_block(job, params, st, 0, b, xs).to(job.out_dtype)
            prm.copy_(y.reshape(prm.shape).to(prm.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        """Back to the fine-tuned weights."""
        for n, prm in self.params.items():
            prm.copy_(self.ft.read(n, 0, self.ft.infos[n].numel).reshape(prm.shape).to(prm.dtype))
