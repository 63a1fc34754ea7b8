"""SLERP of an all-zero tensor follows mergekit (a zero vector is not normalised: θ = π/2)."""
from __future__ import annotations

import math

import pytest
import torch

from checkpoints import make_bert_state, write_model
from weightops.engine import merge
from weightops.io.checkpoint import Checkpoint
from weightops.methods import reference as R


@pytest.mark.parametrize("t", [0.3, 0.5])
def test_slerp_of_a_zero_tensor_is_mergekits(tmp_path, t):
    from mergekit.merge_methods.slerp import slerp as mk_slerp

    a = make_bert_state(0)
    b = make_bert_state(1, base=a)
    name = "encoder.layer.0.attention.self.query.bias"
    a[name] = torch.zeros_like(a[name])  # BERT biases start at zero
    res = merge([write_model(tmp_path / "a", a), write_model(tmp_path / "b", b)], method="slerp", t=t,
                out=tmp_path / "m", quiet=True)
    got = Checkpoint(res.out).load([name])[name]
    want = mk_slerp(torch.tensor(t), a[name], b[name])
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got, math.sin(t * math.pi / 2) * b[name], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(R.slerp({name: a[name]}, {name: b[name]}, t)[name], got, rtol=1e-6, atol=1e-7)
