"""q selection: the searches find the optimum of synthetic objectives; the analytic per-layer q matches
hand-computed values of the formula; proxy-driven auto q runs end to end and is logged."""
from __future__ import annotations

import json
import math

import pytest
import torch

from _fixtures import tiny_bert  # noqa: F401  (fixture)
from weightops.dpp import analytic_q as A
from weightops.dpp.q_search import bounded_search, grid_search, log_grid_search, search
from weightops.errors import WeightopsError


@pytest.mark.parametrize("opt", [0.0137, 0.05, 0.31, 0.999])
def test_grid_search_finds_optimum_within_fine_step(opt):
    calls = []

    def score(q):
        calls.append(q)
        return -(q - opt) ** 2

    r = grid_search(score, 0.01, 1.0, 0.05)
    assert abs(r.x - opt) <= 0.005 / 2 + 1e-9  # the second stage's step is 0.005
    assert all(0.01 - 1e-12 <= q <= 1.0 + 1e-12 for q in calls)  # never leaves [lo, hi] (reference quirk fixed)
    assert r.score == max(s for _, s in r.evaluated)


def test_grid_search_stops_early_after_four_non_improvements():
    seen = []

    def score(q):
        seen.append(q)
        return -abs(q - 0.2)

    grid_search(score, 0.0, 10.0, 0.1)
    coarse = [q for q in seen if abs(q * 10 - round(q * 10)) < 1e-9 and q <= 1.0]
    # coarse: 0.0 .. 0.2 improves, then 0.3 .. 0.6 are four non-improvements -> stop; no q above 0.6
    assert max(seen) <= 0.6 + 1e-9 and 0.6 in [round(q, 6) for q in coarse]


def test_grid_search_ties_keep_the_first_evaluated():
    r = grid_search(lambda q: 1.0, 0.1, 0.5, 0.1)
    assert r.x == 0.1


def test_bounded_search_finds_optimum():
    r = bounded_search(lambda q: -(q - 0.4321) ** 2, 0.01, 1.0, xtol=1e-4)
    assert abs(r.x - 0.4321) < 1e-3
    r = bounded_search(lambda q: q, 0.01, 1.0)  # monotone: the end point wins
    assert r.x == 1.0


def _narrow_peak_near_lo(q):
    # DAREx-q at p = 0.99 in docs/dpp.md: a narrow optimum just above 1 - p = 0.01 and a broad,
    # lower bump further out that a linear coarse grid climbs instead.
    return math.exp(-((q - 0.02) / 0.004) ** 2) + 0.8 * math.exp(-((q - 0.2) / 0.1) ** 2)


def test_log_grid_finds_the_narrow_peak_the_linear_grid_misses():
    lin = grid_search(_narrow_peak_near_lo, 0.01, 1.0, 0.099)
    log = log_grid_search(_narrow_peak_near_lo, 0.01, 1.0)
    assert abs(lin.x - 0.2) < 0.05  # the reference's grid ends on the broad bump
    assert abs(log.x - 0.02) < 0.003 and log.score > 0.75
    assert len(log.evaluated) <= 20
    assert all(0.01 - 1e-12 <= q <= 1.0 + 1e-12 for q, _ in log.evaluated)
    assert search(_narrow_peak_near_lo, 0.01, 1.0, how="log").x == log.x


@pytest.mark.parametrize("opt", [0.0137, 0.05, 0.31, 0.999])
def test_log_grid_finds_smooth_optima(opt):
    r = log_grid_search(lambda q: -(math.log(q) - math.log(opt)) ** 2, 0.01, 1.0)
    assert abs(math.log(r.x / opt)) < math.log(10) / 5 / 5  # within one fine step
    assert log_grid_search(lambda q: 1.0, 0.1, 0.5).x == 0.1  # ties keep the first evaluated


def test_log_grid_needs_positive_lo():
    with pytest.raises(WeightopsError, match="lo > 0"):
        log_grid_search(lambda q: q, 0.0, 1.0)


def test_search_bounds_are_checked():
    with pytest.raises(WeightopsError):
        grid_search(lambda q: q, 0.5, 0.2, 0.1)
    with pytest.raises(WeightopsError):
        grid_search(lambda q: q, 0.1, 0.2, 0.0)


# -- analytic q -------------------------------------------------------------------------

def _hand_q(c_row, p, eta, gamma=0.95, stop_all=False):
    """One row, scanned exactly as the module docstring says (pure Python floats)."""
    s1, s2 = sum(c_row), sum(v * v for v in c_row)
    ph = (1 - 2 * p) / math.log((1 - p) / p)
    qs = [i / 1000 for i in range(math.ceil((1 - p) * 1000 - 1e-9), 999)]
    f = [abs(eta * (1 - (1 - p) / q) * s1 + eta ** 2 * ph * s2 / (4 * q * q) + math.log(2 / (1 - gamma))) for q in qs]
    best = min(f)
    return max(q for q, v in zip(qs, f) if v == best)


def test_phi_values():
    assert A.phi(0.99) == pytest.approx((1 - 1.98) / math.log(0.01 / 0.99))
    assert A.phi(0.5) == 0.5 and A.phi(0.5 + 1e-7) == pytest.approx(0.5, abs=1e-6)


def test_q_grid_starts_at_or_above_one_minus_p():
    for p in (0.8, 0.9, 0.99, 0.999, 0.5):
        g = A.q_grid(p)
        assert g[0] >= 1 - p - 1e-12 and g[0] - (1 - p) < 0.001 and abs(g[-1] - 0.998) < 1e-12
    assert abs(A.q_grid(0.9)[0] - 0.1) < 1e-12  # the reference starts at 0.099 (float floor)


@pytest.mark.parametrize("p,eta", [(0.99, 0.45), (0.9, 1.0), (0.95, 0.3)])
def test_row_q_matches_hand_computation(p, eta):
    g = torch.Generator().manual_seed(1)
    c = torch.randn(6, 40, generator=g, dtype=torch.float64) * torch.tensor([3.0, 0.1, 1.0, 10.0, 0.5, 30.0])[:, None]
    c[1] = c[1].abs()  # a row with positive S1 (the bias term grows with q)
    got = A.row_q(c.sum(1), (c * c).sum(1), p, eta=eta, stop_frac=1.01)  # no early stop
    want = [_hand_q(row.tolist(), p, eta) for row in c]
    assert got.tolist() == pytest.approx(want, abs=1e-12)


def test_row_q_hand_example_positive_s1():
    # S1 = 2, S2 = 4, p = 0.99, eta = 1: f(q) = |(1 - 0.01/q)*2 + phi*4/(4q^2) + ln 40|
    ph = A.phi(0.99)
    qs = [i / 1000 for i in range(10, 999)]
    f = [abs((1 - 0.01 / q) * 2 + ph / q ** 2 + math.log(40)) for q in qs]
    want = qs[max(i for i, v in enumerate(f) if v == min(f))]
    got = A.row_q(torch.tensor([2.0]), torch.tensor([4.0]), 0.99, eta=1.0, stop_frac=1.01)
    assert float(got[0]) == pytest.approx(want)


def _reference_loop(s1, s2, p, eta, stop_frac, gamma=0.95):
    """A transliteration of DAREx analytical_resolve_new (float64, grid starting at >= 1 - p)."""
    ph = (1 - 2 * p) / math.log((1 - p) / p)
    n = len(s1)
    q_o, best, flagged = [1 - p] * n, [math.inf] * n, [False] * n
    for i in range(math.ceil((1 - p) * 1000 - 1e-9), 999):
        q = i * 0.001
        res = [abs(eta * (1 - (1 - p) / q) * a + eta ** 2 * ph * b / (4 * q ** 2) + math.log(2 / (1 - gamma)))
               for a, b in zip(s1, s2)]
        for r in range(n):
            if res[r] >= best[r]:
                flagged[r] = True
            if res[r] <= best[r]:
                best[r], q_o[r] = res[r], q
        if sum(flagged) / n >= stop_frac:
            break
    return q_o


@pytest.mark.parametrize("stop", [0.8, 0.5, 1.01])
def test_row_q_early_stop_matches_the_reference_loop(stop):
    g = torch.Generator().manual_seed(2)
    c = torch.randn(30, 20, generator=g, dtype=torch.float64) * (torch.rand(30, 1, generator=g, dtype=torch.float64) * 40)
    s1, s2 = c.sum(1), (c * c).sum(1)
    got = A.row_q(s1, s2, 0.9, eta=0.7, stop_frac=stop)
    want = _reference_loop(s1.tolist(), s2.tolist(), 0.9, 0.7, stop)
    assert got.tolist() == pytest.approx(want, abs=1e-12)


def test_row_q_early_stop_freezes_slow_rows():
    # row 0: f grows with q (positive S1, no variance) -> optimum at the first q, flagged at the second;
    # row 1: huge variance term -> f falls all the way to 0.998. Stopping at half the rows freezes row 1 early.
    s1 = torch.tensor([10.0, 0.0], dtype=torch.float64)
    s2 = torch.tensor([0.0, 1e6], dtype=torch.float64)
    assert A.row_q(s1, s2, 0.9, eta=1.0, stop_frac=1.01).tolist() == pytest.approx([0.1, 0.998])
    assert A.row_q(s1, s2, 0.9, eta=1.0, stop_frac=0.5).tolist() == pytest.approx([0.1, 0.101])


def test_tensor_q_map_bias_inherits_and_others_take_mean(tmp_path):
    from safetensors.torch import save_file

    from weightops.io.checkpoint import Checkpoint

    g = torch.Generator().manual_seed(0)
    base = {"l1.weight": torch.randn(8, 5, generator=g), "l1.bias": torch.randn(8, generator=g),
            "l2.weight": torch.randn(3, 8, generator=g), "norm.weight": torch.ones(5)}
    ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    for n, sd in (("b", base), ("f", ft)):
        save_file(sd, str(tmp_path / f"{n}.safetensors"))
    b, f = Checkpoint(tmp_path / "b.safetensors"), Checkpoint(tmp_path / "f.safetensors")
    means = {"l1.weight": torch.randn(5, generator=g, dtype=torch.float64) * 5,
             "l2.weight": torch.randn(8, generator=g, dtype=torch.float64) * 5}
    qm = A.tensor_q_map(b, f, means, 0.95, eta=0.5, stop_frac=1.01, block_size=7)
    d = {k: (ft[k] - base[k]).double() for k in base}
    c1 = torch.cat([d["l1.weight"] * means["l1.weight"], d["l1.bias"][:, None]], 1)  # bias = one more input of 1
    q1 = A.row_q(c1.sum(1), (c1 * c1).sum(1), 0.95, eta=0.5, stop_frac=1.01).mean().item()
    c2 = d["l2.weight"] * means["l2.weight"]
    q2 = A.row_q(c2.sum(1), (c2 * c2).sum(1), 0.95, eta=0.5, stop_frac=1.01).mean().item()
    assert qm["l1.weight"] == pytest.approx(q1, abs=1e-12) and qm["l1.bias"] == qm["l1.weight"]
    assert qm["l2.weight"] == pytest.approx(q2, abs=1e-12)
    assert qm["norm.weight"] == pytest.approx((q1 + q2) / 2)
    assert all(0.05 - 1e-12 <= v <= 0.998 for v in qm.values())


# -- end to end on a tiny BERT ---------------------------------------------------------------

def test_auto_q_by_proxy_minimises_the_proxy_and_is_logged(tmp_path, tiny_bert):  # noqa: F811
    from weightops.dpp.api import prune
    from weightops.dpp.inmemory import PrunedModel
    from weightops.dpp.rules import PruneParams
    from weightops.dpp.q_search import load_for_proxy, make_proxy, read_texts

    r = prune(tiny_bert["base"], tiny_bert["ft"], out=tmp_path / "p", method="darex-q", rate=0.95, q="auto",
              proxy_data=str(tiny_bert["texts"]), q_step=0.19, quiet=True)
    log = json.loads((tmp_path / "p" / "weightops.json").read_text())["dpp"]["q"]
    assert log["by"] == "proxy" and log["proxy"] == "hidden" and len(log["evaluated"]) >= 3
    q = log["value"]
    assert 0.05 <= q <= 1.0 and r.dpp["q"]["value"] == q
    # the chosen q beats plain DARE (q = 1 - p) on the proxy, and the model written is the one scored
    model = load_for_proxy(tiny_bert["ft"], False)
    proxy = make_proxy(model, tiny_bert["ft"], read_texts(str(tiny_bert["texts"])), False)
    pm = PrunedModel(model, tiny_bert["base"], tiny_bert["ft"])
    pm.apply("darex-q", PruneParams(rate=0.95, q=0.05))
    dare = proxy()
    pm.apply("darex-q", PruneParams(rate=0.95, q=q))
    assert proxy() <= dare
    from weightops.io.checkpoint import Checkpoint

    written = Checkpoint(tmp_path / "p").load()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], written[k]) for k in params if k in written)


def test_auto_q_analytic_writes_per_tensor_q(tmp_path, tiny_bert):  # noqa: F811
    from weightops.dpp.api import prune

    prune(tiny_bert["base"], tiny_bert["ft"], out=tmp_path / "p", method="darex-q", rate=0.99, q="auto",
          q_by="analytic", calib_data=str(tiny_bert["texts"]), eta=0.45, quiet=True)
    m = json.loads((tmp_path / "p" / "weightops.json").read_text())
    qm = m["params"]["q_map"]
    assert m["dpp"]["q"]["by"] == "analytic" and m["dpp"]["q"]["eta"] == 0.45
    assert all(0.01 - 1e-9 <= v <= 0.998 for v in qm.values())
    assert qm["encoder.layer.0.attention.self.query.bias"] == qm["encoder.layer.0.attention.self.query.weight"]
