"""Fixtures of the intruder tests (helpers in _spectral.py)."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # for _spectral

from _spectral import bert_like, save_adapter, save_ckpt  # noqa: E402


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """A BERT-like base (h=80, 2 layers), a 'full fine-tune' and a rank-4 LoRA adapter on it."""
    root = tmp_path_factory.mktemp("intruders")
    base = bert_like(2, 80, 112, seed=1)
    g = torch.Generator().manual_seed(2)
    ft = {}
    for k, v in base.items():  # small dense change plus a gradient-like change along existing directions
        if v.ndim == 2 and "encoder" in k:
            ft[k] = v + 0.002 * torch.randn(v.shape, generator=g) + 0.05 * v @ (torch.eye(v.shape[1]) * 0.1)
        else:
            ft[k] = v.clone()
    r, alpha = 4, 8.0
    factors = {}
    for k, v in base.items():
        if v.ndim == 2 and ("query" in k or "value" in k or "intermediate" in k):
            factors[k] = (0.3 * torch.randn(v.shape[0], r, generator=g), torch.randn(r, v.shape[1], generator=g) / math.sqrt(v.shape[1]))
    return {
        "root": root, "base_sd": base, "ft_sd": ft, "factors": factors, "r": r, "alpha": alpha,
        "base": save_ckpt(root / "base", base), "ft": save_ckpt(root / "ft", ft),
        "lora": save_adapter(root / "lora", factors, r, alpha),
    }


@pytest.fixture(autouse=True)
def one_thread():
    """Small matrices are latency-bound: on a shared, oversubscribed CPU, two OpenMP threads per tiny op
    make the iterative solvers ~100× slower (measured), so these tests run single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
