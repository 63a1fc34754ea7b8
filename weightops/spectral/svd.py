"""Singular vectors for the intruder analysis: full SVD, a base-SVD cache, and
top-k solvers that are exact to a checked tolerance.

The intruder test needs ALL left singular vectors of the base W0 (every top
vector of W is compared with each of them) but only the top-k of the
fine-tuned W. So:

- the base SVD is a plain `torch.linalg.svd` in fp32 (the paper's and peft's
  call), computed once and cached on disk, keyed by the sha256 of the tensor's
  stored bytes (dtype and shape included), so every target of the same base,
  and every later run, reuses it;
- the top-k of a dense W come from block subspace iteration with a
  Rayleigh-Ritz step, warm-started from the base's top right vectors plus
  random columns (an intruder orthogonal to the base's top subspace is then
  still found), stopped on the residual ‖W v − s u‖;
- the top-k of an adapted W = W0 + B̃·A use the rank-r structure: in the bases
  [U0, Q_B] and [V0, Q_A] (Q_B, Q_A complete the spans of B̃ and Aᵀ), W is
  diag(S0) + X·Y with X, Y of rank r, so each iteration costs O(d·r·p)
  instead of O(m·n·p), in fp64, and the cosines with the base vectors are the
  first d coordinates of the small singular vectors themselves.

Each solver returns a per-vector error estimate (residual / spectral gap,
a Davis-Kahan-style bound) so callers can tell when a cosine lies too close
to a threshold to be trusted and fall back to `full_svd` (the reference).

The gap to the rest of the spectrum is not taken from the iteration's own
Ritz values (a direction the start block barely touches — an intruder
orthogonal to the base's top subspace — is invisible to them, and the
iteration can converge on the wrong k triplets): `Complement` bounds from
above ‖W x‖ over every unit x orthogonal to the k found right vectors, so
σ_{k+1}(W) ≤ c (Courant–Fischer). The space splits into a head H (the
base's top-q right vectors, and for adapters the update's row space, minus
the found ones: computed exactly, with its coupling to the rest) and the
rest T, where ‖W0 t‖ ≤ σ_{q+1}(W0) and ‖ΔW t‖ ≤ η, a norm of ΔW on T (0 for a low-rank update whose
row space is in H; the Frobenius norm, else the Schatten-4 norm
(Σσ⁴)^{1/4} for a dense one). If c does not stay below the k-th found value
minus the residual, the answer is not certified (`certified = False`) and
callers fall back to the full SVD.
"""
from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_VERSION = "1"


@dataclass
class SVD:
    """W = U diag(S) Vhᵀ (thin), fp32 unless said otherwise."""

    U: torch.Tensor  # m×d
    S: torch.Tensor  # d
    Vh: torch.Tensor  # d×n


def full_svd(W: torch.Tensor) -> SVD:
    """The reference: thin fp32 SVD by LAPACK, as the paper's code and peft compute it."""
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    return SVD(U, S, Vh)


@dataclass
class TopK:
    """Top-k singular triplets of W and the |cos| of each left vector with every base left vector."""

    U: torch.Tensor  # m×k, or None when not materialised (low-rank path before `vectors()`)
    S: torch.Tensor  # k
    V: torch.Tensor  # n×k
    cos: torch.Tensor  # d×k: |U0ᵀ u_j|
    err: torch.Tensor  # k: bound on the error of each cosine (0 for the full SVD)
    solver: str
    iterations: int = 0
    residual: float = 0.0  # max_j ‖W v_j − s_j u_j‖ / s_1
    certified: bool = True  # the k found are the top k: the rest of the spectrum is bounded below them
    tail: float = 0.0  # the bound c ≥ σ_{k+1}(W) that certified it


# -- the base SVD cache --------------------------------------------------------------


def default_cache_dir() -> Path:
    """$WEIGHTOPS_CACHE/svd, else $XDG_CACHE_HOME/weightops/svd (~/.cache/weightops/svd)."""
    env = os.environ.get("WEIGHTOPS_CACHE")
    if env:
        return Path(env) / "svd"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "weightops" / "svd"


def tensor_key(flat: torch.Tensor, shape) -> str:
    """sha256 of a tensor's stored bytes, dtype and shape: equal keys mean an equal SVD."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{str(flat.dtype)}:{list(shape)}:torch{torch.__version__}:".encode())
    if flat.numel():
        h.update(flat.contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()


class SVDCache:
    """Base SVDs on disk, one safetensors file per tensor content; `root=None` keeps nothing."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root is not None else None
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, flat: torch.Tensor, shape) -> SVD:
        """The SVD of the matrix whose stored elements are `flat`, from disk or computed (and stored)."""
        from safetensors.torch import load_file, save_file

        W = flat.reshape(shape)
        if self.root is None:
            self.misses += 1
            return full_svd(W)
        key = tensor_key(flat, shape)
        path = self._path(key)
        if path.is_file():
            try:
                t = load_file(str(path))
                m, n = shape
                d = min(m, n)
                if tuple(t["U"].shape) == (m, d) and tuple(t["Vh"].shape) == (d, n):
                    self.hits += 1
                    return SVD(t["U"], t["S"], t["Vh"])
            except Exception:  # a truncated or foreign file is just a miss; it gets rewritten below
                pass
        self.misses += 1
        svd = full_svd(W)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
            save_file({"U": svd.U.contiguous(), "S": svd.S.contiguous(), "Vh": svd.Vh.contiguous()}, str(tmp),
                      metadata={"weightops_svd_cache": CACHE_VERSION})
            os.replace(tmp, path)
        except OSError:  # a read-only or full cache disk only costs speed
            pass
        return svd


# -- top-k solvers ---------------------------------------------------------------------


def subspace_topk(matmul, rmatmul, start: torch.Tensor, k: int, *, tol: float, max_iter: int):
    """Top-k singular triplets of the operator W (given by x ↦ Wx, y ↦ Wᵀy) by block subspace iteration.

    `start` (n×p, p > k) spans the initial right subspace. Each step: Q = orth(W V),
    Rayleigh-Ritz on Qᵀ W (so Wᵀu_j = s_j v_j holds exactly), stop when
    ‖W v_j − s_j u_j‖ ≤ tol·s_1 for j < k. Returns U, S, V (first k), the
    residuals and the number of iterations; `certify` turns residuals into error bounds.
    """
    V = torch.linalg.qr(start).Q
    U = S = None
    res = None
    history: list[float] = []
    it = 0
    for it in range(max_iter + 1):
        Y = matmul(V)
        if U is not None:
            res = (Y[:, :k] - U[:, :k] * S[:k]).norm(dim=0)
            rel = float(res.max() / S[0]) if float(S[0]) > 0 else 0.0
            history.append(rel)
            # Converged, out of steps, or stuck at the rounding floor (no 5% gain in 8 steps).
            stalled = len(history) > 8 and rel > 0.95 * history[-9] and rel < 1e3 * tol
            if rel <= tol or it == max_iter or stalled:
                break
        Q = torch.linalg.qr(Y).Q
        Ub, S, Vh = torch.linalg.svd(rmatmul(Q).T, full_matrices=False)
        U, V = Q @ Ub, Vh.T
    return U[:, :k], S[:k], V[:, :k], res, it


def block_size(k: int, d: int) -> int:
    return min(d, k + max(k, 16))


# Relative slack for the fp32 arithmetic of the certificate (and of the reference SVD it stands in for).
CERT_SLACK = 1e-5
# Adapters: up to this d, an uncertified answer is retried with every base direction in the head (exact, cheap
# in the small basis) before falling back to the full SVD.
FULL_HEAD_MAX = 1024


def head_size(k: int, d: int) -> int:
    """q base directions in the certificate's head: all of them for small matrices, else a few times k."""
    return d if d <= 256 else min(d, max(64, 4 * k))


class Complement:
    """Bounds on ‖W x‖ over unit x ⊥ span(V), from the exact head part and a bound on the rest (module docstring).

    In the basis [Q_H, Q_T] (T = span([V, head])⊥), Π WᵀW Π = [[A, C], [Cᵀ, D]] with A = (W Q_H)ᵀ(W Q_H) and
    CCᵀ = G = F Π_T Fᵀ, F = (W Q_H)ᵀ W, both computed exactly (h×h), and D ⪯ δ I with δ = (σ_{q+1}(W0) + η)²,
    η ≥ ‖ΔW Π_T‖. An eigenvalue λ > δ of that matrix satisfies λ ≤ g(λ) = λ_max(A + G/(λ − δ)) (eliminate the
    T part of its eigenvector; (λ − D)⁻¹ ⪯ (λ − δ)⁻¹), and g decreases, so λ_max ≤ λ*, the root of g(λ) = λ:
    found by bisection below the cruder 2×2 bound λ_max([[‖A‖, ‖G‖^½], [‖G‖^½, δ]])."""

    def __init__(self, matmul, rmatmul, V: torch.Tensor, head: torch.Tensor, sigma_next: float):
        n, k = V.shape
        self.Z = torch.linalg.qr(torch.cat([V, head.to(V.dtype)], dim=1)).Q  # leading k columns span V
        self.sigma_next = sigma_next
        self.full = self.Z.shape[1] >= n  # T is empty
        QH = self.Z[:, k:]
        WQ = matmul(QH).double()
        self.A = WQ.T @ WQ
        self.alpha = float(torch.linalg.eigvalsh(self.A).max()) if QH.shape[1] else 0.0
        self.G = torch.zeros_like(self.A)
        if not self.full and QH.shape[1]:
            F = rmatmul(WQ.to(V.dtype)).T.double()  # (W Q_H)ᵀ W
            Zd = self.Z.double()
            FT = F - (F @ Zd) @ Zd.T
            self.G = FT @ FT.T
        self.gamma = float(torch.linalg.eigvalsh(self.G).max().clamp_min(0)) ** 0.5 if QH.shape[1] else 0.0

    def bound(self, eta: float) -> float:
        if self.full or self.A.shape[0] == 0:
            return max(self.alpha, 0.0) ** 0.5 if self.full else self.sigma_next + eta
        a, d, g = self.alpha, (self.sigma_next + eta) ** 2, self.gamma
        hi = (a + d) / 2 + (((a - d) / 2) ** 2 + g * g) ** 0.5  # the 2×2 bound: g(hi) ≤ hi
        lo = max(a, d)  # λ* ≥ λ_max(A) and > δ
        if g == 0.0:
            return lo ** 0.5
        for _ in range(60):  # bisection on g(λ) − λ (decreasing); keeps g(hi) ≤ hi
            mid = (lo + hi) / 2
            if mid <= d:
                lo = mid
                continue
            if float(torch.linalg.eigvalsh(self.A + self.G / (mid - d)).max()) > mid:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-12 * hi:
                break
        return hi ** 0.5


def certify(S: torch.Tensor, res: torch.Tensor, complement: Complement, etas) -> tuple[torch.Tensor, bool, float]:
    """(per-vector cosine error bounds, certified, tail bound) for found values S (k) with residuals res (k).

    `etas`: callables Z -> η, cheapest first; the first that certifies wins. Uncertified: errors of 2,
    more than any cosine can be off, so every ε counts as ambiguous."""
    S, res = S.double(), res.double()
    k = S.shape[0]
    scale = float(S[0]) if k and float(S[0]) > 0 else 0.0
    if scale == 0.0:  # W = 0: every direction is as good as any other, and so is the reference's
        return torch.zeros(k), True, 0.0
    rnorm = float(res.norm())
    slack = CERT_SLACK * scale
    c = float("inf")
    for eta in etas:
        c = complement.bound(0.0 if complement.full else float(eta(complement.Z)))
        if c < float(S[-1]) - rnorm - slack:
            break
    else:
        return torch.full((k,), 2.0), False, c
    diff = (S[:, None] - S[None, :]).abs() - rnorm
    diff[torch.arange(k), torch.arange(k)] = float("inf")
    gaps = torch.minimum(diff.min(dim=1).values, S - c) - slack
    # Davis–Kahan: sin∠ ≤ residual/gap; ‖u − u*‖ ≤ √2 sin∠ and |Δcos| ≤ ‖u − u*‖
    err = torch.where(gaps > 0, (res / gaps.clamp_min(1e-300)).clamp(max=1.0) * (2 ** 0.5), torch.tensor(2.0, dtype=torch.float64))
    return err.float(), True, c


def _schatten4(E: torch.Tensor) -> float:
    """An upper bound on (Σσ⁴)^{1/4} = ‖EᵀE‖_F^{1/2} ≥ ‖E‖₂, from the Gram matrix of the smaller side.

    The Gram is an fp32 product (the cost of the whole certificate); each entry is off by at most
    inner·2^-24·‖e_i‖‖e_j‖, so ‖G‖_F by at most inner^1.5·2^-24·‖G‖_F, which the bound adds."""
    E = E.float()
    G = E @ E.T if E.shape[0] <= E.shape[1] else E.T @ E
    inner = max(E.shape)
    return (float(G.double().norm()) * (1 + inner ** 1.5 * 2.0 ** -23)) ** 0.5


def topk_dense(W: torch.Tensor, base: SVD, k: int, *, tol: float = 1e-5, max_iter: int = 300,
               generator: torch.Generator | None = None, start: torch.Tensor | None = None,
               W0: torch.Tensor | None = None) -> TopK:
    """Top-k of a dense W (fp32), warm-started from the base's top right vectors (or `start`, n×k), certified
    against the rest of the spectrum (`W0`, the base matrix, for ΔW = W − W0; rebuilt from `base` if not given)."""
    m, n = W.shape
    d = min(m, n)
    k = min(k, d)
    p = block_size(k, d)
    rand = torch.randn(n, p - k, generator=generator, dtype=torch.float32)
    start = torch.cat([base.Vh[:k].T if start is None else start[:, :k], rand], dim=1)
    U, S, V, res, it = subspace_topk(lambda x: W @ x, lambda y: W.T @ y, start, k, tol=tol, max_iter=max_iter)
    cos = (base.U.T @ U).abs()
    q = head_size(k, d)
    comp = Complement(lambda x: W @ x, lambda y: W.T @ y, V, base.Vh[:q].T, float(base.S[q]) if q < d else 0.0)
    if W0 is None:
        W0 = (base.U * base.S) @ base.Vh
    E = W.float() - W0.float()
    # ΔW = W − W0 as fp32 computed it: its rounding (≤ half an ulp of |W| per element) is covered by the slack
    fro2 = float(E.double().square().sum())

    def eta_fro(Z):  # ‖ΔW Π_T‖_F² = ‖ΔW‖_F² − ‖ΔW Z‖_F²
        return max(0.0, fro2 - float((E @ Z).double().square().sum())) ** 0.5

    def eta_s4(Z):  # the Schatten-4 norm of ΔW Π_T: one Gram matrix, for dense noise far below Frobenius
        return _schatten4(E - (E @ Z) @ Z.T)

    err, ok, tail = certify(S[:k], res, comp, (eta_fro, eta_s4))
    return TopK(U, S, V, cos, err, "subspace", it, float(res.max() / S[0]) if float(S[0]) > 0 else 0.0, ok, tail)


def _complete(basis: torch.Tensor, F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F = basis·C + Q·R with Q orthonormal and ⊥ basis (two Gram-Schmidt passes); Q is empty when basis is complete."""
    C = basis.T @ F
    if basis.shape[1] >= basis.shape[0]:
        return C, F.new_zeros(F.shape[0], 0), F.new_zeros(0, F.shape[1])
    R0 = F - basis @ C
    C2 = basis.T @ R0
    R0 = R0 - basis @ C2
    Q, R = torch.linalg.qr(R0)
    Q = Q - basis @ (basis.T @ Q)  # keep Q ⊥ basis even when R0 is rounding noise
    return C + C2, Q, R


@dataclass
class LowRankTopK(TopK):
    """Top-k of W0 + B̃A in the completed bases; `vectors()` maps them back to R^m, R^n."""

    small_U: torch.Tensor = None  # (d + rb)×k
    small_V: torch.Tensor = None  # (d + ra)×k
    Qb: torch.Tensor = None
    Qa: torch.Tensor = None
    base: SVD = None

    def vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.base.S.shape[0]
        U0, V0 = self.base.U.double(), self.base.Vh.T.double()
        U = U0 @ self.small_U[:d] + self.Qb @ self.small_U[d:]
        V = V0 @ self.small_V[:d] + self.Qa @ self.small_V[d:]
        return U.float(), V.float()


def topk_lowrank(base: SVD, Bs: torch.Tensor, A: torch.Tensor, k: int, *, tol: float = 1e-10,
                 max_iter: int = 2000, generator: torch.Generator | None = None) -> LowRankTopK:
    """Top-k of W = W0 + Bs·A (Bs m×r already scaled, A r×n) from the base SVD, in fp64."""
    U0, S0, V0 = base.U.double(), base.S.double(), base.Vh.T.double()
    Bs, A = Bs.double(), A.double()
    d = S0.shape[0]
    Xb, Qb, Rb = _complete(U0, Bs)  # Bs = U0·Xb + Qb·Rb
    Ya, Qa, Ra = _complete(V0, A.T)  # Aᵀ = V0·Ya + Qa·Ra
    X = torch.cat([Xb, Rb], dim=0)  # (d+rb)×r
    Y = torch.cat([Ya, Ra], dim=0).T  # r×(d+ra)
    rows, cols = X.shape[0], Y.shape[1]

    def matmul(v):  # M v, M = diag(S0) (zero-padded) + X·Y
        out = X @ (Y @ v)
        out[:d] += S0[:, None] * v[:d]
        return out

    def rmatmul(u):
        out = Y.T @ (X.T @ u)
        out[:d] += S0[:, None] * u[:d]
        return out

    kk = min(k, min(rows, cols))
    p = min(min(rows, cols), kk + max(kk, 16) + A.shape[0])
    eye = torch.zeros(cols, min(kk, d), dtype=torch.float64)
    eye[torch.arange(min(kk, d)), torch.arange(min(kk, d))] = 1.0
    extra = torch.randn(cols, max(0, p - eye.shape[1] - Y.shape[0]), generator=generator, dtype=torch.float64)
    start = torch.cat([eye, Y.T, extra], dim=1)[:, :p]
    sU, S, sV, res, it = subspace_topk(matmul, rmatmul, start, kk, tol=tol, max_iter=max_iter)
    # Directions outside span(U0) exist only for tall W0 (m > n); they have cosine 0 with every base vector.
    cos = sU[:d].abs()
    if kk < k:  # W has fewer than k nonzero directions in this basis (k > min(m, n) is clipped earlier)
        k = kk
    # Certificate in the small basis: the head holds the base's top q directions and the update's row space,
    # so the update vanishes on the rest (η = 0) and the base there is at most σ_{q+1}. Cheap here, so q grows
    # until σ_{q+1}(W0) is below the k-th value found (a flat base spectrum needs many directions).
    q = head_size(kk, d)
    target = float(S[-1]) - float(res.norm()) - CERT_SLACK * float(S[0]) if kk else 0.0
    if q < d and float(S0[q]) >= 0.999 * target:
        below = (S0 < 0.999 * target).nonzero()
        q = int(below[0]) if len(below) else d

    def attempt(q):
        eye_q = torch.zeros(cols, q, dtype=torch.float64)
        eye_q[torch.arange(q), torch.arange(q)] = 1.0
        comp = Complement(matmul, rmatmul, sV, torch.cat([eye_q, Y.T], dim=1), float(S0[q]) if q < d else 0.0)
        return certify(S, res, comp, (lambda Z: 0.0,))

    err, ok, tail = attempt(q)
    if not ok and q < d <= FULL_HEAD_MAX:  # the head couples to the rest (an update spread over the tail): take all
        err, ok, tail = attempt(d)
    return LowRankTopK(None, S.float(), None, cos.float(), err, "lowrank", it,
                       float(res.max() / S[0]) if float(S[0]) > 0 else 0.0, ok, tail,
                       small_U=sU, small_V=sV, Qb=Qb, Qa=Qa, base=base)


def topk_exact(W: torch.Tensor, base: SVD, k: int) -> TopK:
    """Top-k from the full SVD of W (the reference path)."""
    svd = full_svd(W)
    k = min(k, svd.S.shape[0])
    U, S, V = svd.U[:, :k], svd.S[:k], svd.Vh[:k].T
    return TopK(U, S, V, (base.U.T @ U).abs(), torch.zeros(k), "exact", 0, 0.0)
