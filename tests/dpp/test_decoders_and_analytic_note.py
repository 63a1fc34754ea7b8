"""Which checkpoints are decoders for the DAREx proxy (top-5 logit MSE), and the fp16 note on the analytic q."""
from __future__ import annotations

import json
import math

import torch

from checkpoints import TINY_BERT, TINY_LLAMA
from weightops.dpp import analytic_q
from weightops.dpp.q_search import is_decoder


def test_gpt2_and_other_causal_lms_are_decoders(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path / "gpt2")
    for name, cfg in (("llama", TINY_LLAMA), ("bert", TINY_BERT)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    assert is_decoder(tmp_path / "gpt2")  # GPT2LMHeadModel: no "ForCausalLM" in its name
    assert is_decoder(tmp_path / "llama")
    assert not is_decoder(tmp_path / "bert")


def _reference_fp16_row_q(c: torch.Tensor, p: float, eta: float = analytic_q.ETA) -> torch.Tensor:
    """vengdeng/DAREx analyticalq.py as the research note reads it: c in float16, S1/S2 and f in float16,
    scan from 1 − p up by 0.001, ties to the larger q, stop once 80% of the rows passed their best."""
    c = c.half()
    s1, s2 = c.sum(1), (c * c).sum(1)
    grid = analytic_q.q_grid(p)
    phi = torch.tensor(analytic_q.phi(p), dtype=torch.float16)
    const = torch.tensor(math.log(2 / (1 - analytic_q.GAMMA)), dtype=torch.float16)
    best = torch.full((c.shape[0],), float("inf"), dtype=torch.float16)
    q = torch.full((c.shape[0],), float(grid[0]))
    flagged = torch.zeros(c.shape[0], dtype=torch.bool)
    for qq in grid.tolist():
        qh = torch.tensor(qq, dtype=torch.float16)
        f = (eta * (1 - (1 - p) / qh) * s1 + eta ** 2 * phi * s2 / (4 * qh * qh) + const).abs()
        flagged |= f >= best
        better = (f <= best) & ~flagged
        q = torch.where(better, torch.tensor(qq), q)
        best = torch.minimum(best, f)
        if flagged.float().mean() >= analytic_q.STOP_FRAC:
            break
    return q


def test_analytic_q_near_half_comes_from_fp64_not_from_the_reference():
    """docs/dpp.md: with small c = δ·x̄ the constant ln 40 swamps f in float16, so the reference's f is flat and its
    q stays at 1 − p (+ one step); our float64 f resolves the terms and q follows the sign of S1 (mean ≈ 0.5)."""
    g = torch.Generator().manual_seed(0)
    c = 1e-4 * torch.randn(400, 256, generator=g, dtype=torch.float64)  # deltas ~1e-3 times mean inputs ~0.1
    p = 0.9
    ours = analytic_q.row_q(c.sum(1), (c * c).sum(1), p)
    ref = _reference_fp16_row_q(c, p)
    assert float(ref.max()) <= 1 - p + 0.0011  # q ≈ 1 − p
    assert 0.3 < float(ours.mean()) < 0.7 and float(ours.max()) > 0.9  # sign-of-S1 driven, as docs/dpp.md says
