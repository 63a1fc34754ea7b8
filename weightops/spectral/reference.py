"""Whole-matrix references for the intruder analysis, written from the paper's
code (reeceshuttle/intruder-dimensions, find_intruder_dimensions.py) and peft's
`reduce_intruder_dimension`: two full fp32 SVDs per matrix, the full
similarity matrix, no caching, no shortcuts. Tests and the benchmark hold the
fast paths to these.
"""
from __future__ import annotations

import torch


def best_cosines(W0: torch.Tensor, W: torch.Tensor, k: int = 10) -> torch.Tensor:
    """max_i |cos(u_j(W), u_i(W0))| for the top-k left singular vectors u_j of W."""
    U0 = torch.linalg.svd(W0.float(), full_matrices=False).U
    U = torch.linalg.svd(W.float(), full_matrices=False).U
    sim = torch.einsum("ji,jk->ik", U, U0).abs()  # the paper's einsum: [tuned, base]
    return sim.max(dim=1).values[:k]


def count_intruders(W0: torch.Tensor, W: torch.Tensor, eps: float = 0.5, k: int = 10) -> int:
    return int((best_cosines(W0, W, k) < eps).sum())


def lora_weight(W0: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float, r: int, rslora: bool = False) -> torch.Tensor:
    """peft's merged weight: W0 + (alpha/r)·B·A, or alpha/√r with rsLoRA."""
    scale = alpha / (r ** 0.5) if rslora else alpha / r
    return W0.float() + scale * (B.float() @ A.float())


def mitigate(W0: torch.Tensor, W: torch.Tensor, lam: float = 0.75, eps: float = 0.5, k: int = 10) -> torch.Tensor:
    """peft's step 4 on the merged matrix: W + (λ−1)·Σ_intruders u s vᵀ (each intruder's σ times λ)."""
    U0 = torch.linalg.svd(W0.float(), full_matrices=False).U
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    best = (U.T @ U0).abs().max(dim=1).values
    idx = torch.where(best[:k] < eps)[0]
    return W.float() + (lam - 1) * (U[:, idx] * S[idx]) @ Vh[idx]


def model_counts(base: dict, tuned: dict, names: list[str], eps: float = 0.5, k: int = 10) -> dict[str, int]:
    return {n: count_intruders(base[n], tuned[n], eps, k) for n in names}
