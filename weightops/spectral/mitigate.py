"""Intruder mitigation: scale each intruder's singular value by λ.

W' = W + (λ−1)·Σ_{j ∈ intruders} u_j s_j v_jᵀ, with (u_j, s_j, v_j) the top-k
singular triplets of the fine-tuned (LoRA: merged) W found at ε; λ = 1 keeps
W, λ = 0 removes the intruders, peft's default is 0.75. This is peft's
`reduce_intruder_dimension` step 4 (and the paper's intervention).

- `write_model`: the merged W' of every matrix, through the engine's streaming
  writer (the rest of the checkpoint is the target's, unchanged); exact, no
  truncation.
- `write_adapter` (LoRA targets): like peft, ΔW' = W' − W0 is written back as a
  rank-r adapter (best rank-r approximation, √S split between B and A, same
  r and alpha). ΔW' generally has rank r + #intruders, so this loses part of
  it; the relative Frobenius error of each matrix is reported.
"""
from __future__ import annotations

import math

import torch

from weightops.errors import WeightopsError, check_finite
from weightops.io.adapter import lowrank_block
from weightops.methods.base import MergeParams, Method


class ScaleIntruders(Method):
    """θ = θ_target + P·Qᵀ per corrected matrix (P = U_I·(λ−1)·S_I, Q = V_I); other tensors unchanged."""

    name = "scale_intruders"
    summary = "scale the singular values of intruder dimensions by λ (Shuttleworth et al.; peft reduce_intruder_dimension)"
    reference_url = "https://arxiv.org/abs/2410.21228"
    needs_base = True
    min_models = max_models = 1

    def __init__(self, corrections: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.corrections = corrections

    def merge_block(self, job, p, state, start, base, models):
        x = models[0].float()
        c = self.corrections.get(job.name)
        if c is None:
            return x
        P, Q = c
        return x + lowrank_block(P, Q.T, job.shape[1], start, start + x.numel())


def corrections(results, lam: float, eps: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for r in results:
        idx = r.intruders(eps)
        if not idx:
            continue
        U, S, V = r.vectors
        out[r.name] = (U[:, idx] * ((lam - 1.0) * S[idx]), V[:, idx].contiguous())
    return out


def _check_lambda(lam: float) -> None:
    if not (math.isfinite(lam) and lam >= 0):
        raise WeightopsError(f"--scale (λ) must be a finite number ≥ 0, got {lam}")
    check_finite(scale=lam)


def _analyse(base, target, opts, quiet, command):
    from weightops.spectral.intruders import Options, analyse

    opts = opts or Options()
    opts.keep_vectors = True
    report, kept = analyse(base, [target], opts=opts, quiet=quiet, command=command, _keep_results=True)
    return opts, report, kept[0]


def _summary(report, fixes, lam, opts) -> dict:
    return {"lambda": lam, "eps": opts.eps, "top_k": opts.top_k,
            "scaled": {n: [j + 1 for j in r] for n, r in fixes.items()},
            "total": sum(len(r) for r in fixes.values()), "report_total": report["targets"][0]["total"]}


def write_model(base: str, target: str, out: str, *, lam: float = 0.75, opts=None, dtype: str | None = None,
                shard_size="5GB", block_size: int | None = None, force: bool = False, quiet: bool = False,
                command: list[str] | None = None):
    """Write the mitigated merged model W' to `out` (atomic, HF layout); returns (report, MergeResult)."""
    from weightops.engine import run_streaming
    from weightops.io.checkpoint import Checkpoint, open_source

    _check_lambda(lam)
    opts, report, results = _analyse(base, target, opts, quiet, command)
    fixes = corrections(results, lam, opts.eps)
    scaled = {r.name: r.intruders(opts.eps) for r in results if r.intruders(opts.eps)}
    base_src = Checkpoint(base)
    src = open_source(target, base_src)
    res = run_streaming(ScaleIntruders(fixes), MergeParams(), base_src, [src], out=out, dtype=dtype,
                        shard_size=shard_size, block_size=block_size, force=force, quiet=quiet, command=command,
                        manifest_extra={"intruders": _summary(report, scaled, lam, opts)})
    return report, res


def truncate_rank(B: torch.Tensor, A: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-r approximation of B·A (any inner rank) as B'·A' with √S split evenly; returns the relative loss."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    Us, S, Vhs = torch.linalg.svd(Rb @ Ra.T)
    root = S[:r].sqrt()
    B_new = Qb @ (Us[:, :r] * root)
    A_new = (root[:, None] * Vhs[:r]) @ Qa.T
    total = float(S.square().sum())
    loss = math.sqrt(float(S[r:].square().sum()) / total) if total > 0 else 0.0
    return B_new.float(), A_new.float(), loss


def write_adapter(base: str, target: str, out: str, *, lam: float = 0.75, opts=None, force: bool = False,
                  quiet: bool = False, command: list[str] | None = None):
    """peft-style: the mitigated ΔW of each LoRA matrix written back at the adapter's rank; returns (report, losses)."""
    from weightops.io.checkpoint import ADAPTER_CONFIG, Checkpoint, open_source
    from weightops.io.writer import CheckpointWriter

    _check_lambda(lam)
    base_ck = Checkpoint(base)
    src = open_source(target, base_ck)
    if src.kind != "lora":
        raise WeightopsError(f"{target}: --write-adapter needs a LoRA adapter target; use --write-model for checkpoints")
    opts, report, results = _analyse(base, target, opts, quiet, command)
    fixes = corrections(results, lam, opts.eps)
    new: dict[str, torch.Tensor] = {}
    losses: dict[str, float] = {}
    for name, (P, Q) in fixes.items():
        f = src.factors.get(name)
        if f is None:  # a modules_to_save matrix: no factors to write back into
            raise WeightopsError(f"'{name}' is saved whole in the adapter (modules_to_save); use --write-model")
        B, A = f.factors()
        # ΔW'/scale = [B, P/scale]·[A; Qᵀ], truncated back to rank r (peft divides by the scaling too).
        B2, A2, losses[name] = truncate_rank(torch.cat([B, P / f.scale], 1), torch.cat([A, Q.T], 0), f.rank)
        if f.transpose:  # the file holds (B_f A_f)ᵀ's factors: B_f = A'ᵀ, A_f = B'ᵀ
            B2, A2 = A2.T, B2.T
        new[f.b.name] = B2.contiguous().to(f.b.dtype)
        new[f.a.name] = A2.contiguous().to(f.a.dtype)
    layout = [(n, i.dtype, i.shape) for n, i in src.file.tensors.items()]
    with CheckpointWriter(out, layout, force=force, file_name="adapter_model.safetensors",
                          metadata={"weightops_method": "scale_intruders"}) as w:
        for n, info in src.file.tensors.items():
            w.write(n, new[n].reshape(-1) if n in new else src.file.read(info, 0, info.numel))
        w.add_file(src.path / ADAPTER_CONFIG)
        w.add_json("weightops.json", {"command": command, "method": "scale_intruders",
                                      "intruders": _summary(report, {r.name: r.intruders(opts.eps) for r in results
                                                                     if r.intruders(opts.eps)}, lam, opts),
                                      "rank_truncation_loss": losses,
                                      "inputs": [{"role": "base", "path": str(base_ck.path)},
                                                 {"role": "adapter", "path": str(src.path), "files": src.file_hashes()}]})
        w.commit()
    src.close()
    base_ck.close()
    return report, losses
