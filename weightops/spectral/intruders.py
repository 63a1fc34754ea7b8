"""Intruder dimensions ("LoRA vs Full Fine-tuning: An Illusion of Equivalence").

For each analysed matrix (attention and MLP linear weights of the transformer
blocks; not embeddings, norms, biases, pooler or heads) the top-k left
singular vectors of the fine-tuned W (for a LoRA adapter, the merged
W0 + scale·B·A) are compared with ALL left singular vectors of the base W0;
vector j is an intruder at ε when max_i |cos(u_j, u0_i)| < ε (strict). The
model's count is the plain sum over matrices (the paper's code, and peft's
`reduce_intruder_dimension`, compute exactly this with two full SVDs).

We compute the same numbers faster (see `svd.py`): cached base SVDs, top-k
by subspace iteration (dense W) or from the rank-r structure (adapters), and
a per-vector error bound; any matrix where a cosine lies within that bound
(plus 1e-5 for the reference's own fp32 noise) of a threshold in the ε grid
is recomputed with the full SVD, so the counts at every grid ε are the
reference's.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import math
import re
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightops import __version__
from weightops.errors import WeightopsError, check_finite
from weightops.io.checkpoint import Checkpoint, is_adapter_dir, open_source
from weightops.spectral import svd as _svd

DEFAULT_EPS = 0.5
DEFAULT_TOP_K = 10
DEFAULT_EPS_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 … 0.95


def eps_value(e: float) -> float:
    """Every ε (the one reported and the grid's) to 6 significant digits, the precision the report's keys
    (f"{e:g}") carry: the count at ε and the count under ε's key are then one number."""
    return float(f"{float(e):.6g}")
# Margin for the reference's own rounding: a cosine this close to ε may land on
# either side in an fp32 LAPACK SVD, so such matrices take the reference path.
REFERENCE_MARGIN = 1e-5
# Linear layers of attention and MLP blocks across common architectures (BERT,
# Llama/Mistral/Qwen, GPT-2, Falcon, Phi, MPT); the layer index keeps poolers
# and heads out.
LINEAR_NAMES = ("q_proj|k_proj|v_proj|o_proj|out_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj|"
                "query|key|value|dense|fc1|fc2|c_attn|c_proj|c_fc|wq|wk|wv|wo|w1|w2|w3|Wqkv|"
                "query_key_value|dense_h_to_4h|dense_4h_to_h")
DEFAULT_MODULES = rf"\.\d+\.(.*\.)?({LINEAR_NAMES})\.weight$"
EXCLUDED = re.compile(r"embed|norm|lm_head|classifier|pooler|score\.")
SOLVERS = ("auto", "fast", "exact")
SMALL = 64  # matrices with min(m, n) ≤ SMALL: a full SVD is as cheap as iterating


@dataclass
class Options:
    top_k: int = DEFAULT_TOP_K
    eps: float = DEFAULT_EPS
    eps_grid: tuple[float, ...] = DEFAULT_EPS_GRID
    modules: str | None = None  # regex on tensor names (re.search); None: DEFAULT_MODULES
    solver: str = "auto"
    cache_dir: str | None = "default"  # None: no cache
    workers: int = 1
    seed: int = 0
    keep_vectors: bool = False  # keep intruder (u, s, v) for mitigation
    detail_k: int = 64  # base vectors shown in the cosine-matrix plot

    def __post_init__(self) -> None:
        self._round()

    def _round(self) -> None:
        self.eps = eps_value(self.eps)
        self.eps_grid = tuple(eps_value(e) for e in self.eps_grid)

    def validate(self) -> None:
        self._round()
        if self.top_k < 1:
            raise WeightopsError(f"--top-k must be at least 1, got {self.top_k}")
        check_finite(eps=self.eps, eps_grid=list(self.eps_grid))
        for e in (self.eps, *self.eps_grid):
            if not (0.0 < e <= 1.0):
                raise WeightopsError(f"ε values must be in (0, 1], got {e}")
        if self.solver not in SOLVERS:
            raise WeightopsError(f"--solver must be one of {', '.join(SOLVERS)}, got {self.solver}")
        if self.workers < 1:
            raise WeightopsError(f"--workers must be at least 1, got {self.workers}")
        try:
            re.compile(self.modules or DEFAULT_MODULES)
        except re.error as e:
            raise WeightopsError(f"--modules is not a valid regex: {e}") from None

    @property
    def grid(self) -> list[float]:
        return sorted(set(eps_value(e) for e in (*self.eps_grid, self.eps)))


def layer_and_module(name: str) -> tuple[int | None, str]:
    """'encoder.layer.3.attention.self.query.weight' -> (3, 'attention.self.query')."""
    m = re.search(r"\.(\d+)\.", name)
    stem = name[:-len(".weight")] if name.endswith(".weight") else name
    if m is None:
        return None, stem
    return int(m.group(1)), stem[m.end():]


def select_matrices(base: Checkpoint, source, modules: str | None) -> list[str]:
    """Analysed tensors: 2-D float weights matching the filter that the target changes (adapters) or has."""
    pattern = re.compile(modules or DEFAULT_MODULES)
    default = modules is None
    out = []
    for name, info in base.infos.items():
        if len(info.shape) != 2 or info.numel == 0 or not info.is_float or not pattern.search(name):
            continue
        if default and EXCLUDED.search(name):
            continue
        if getattr(source, "kind", "") == "lora":
            if name not in source.factors and name not in source.replaced:
                continue  # W = W0: nothing to find
        else:
            t = source.infos.get(name)
            if t is None:
                raise WeightopsError(f"{source.path} has no tensor '{name}' of the base {base.path}; is it a fine-tune of that base?")
            if tuple(t.shape) != tuple(info.shape):
                raise WeightopsError(f"'{name}' is {list(t.shape)} in {source.path} but {list(info.shape)} in the base")
        out.append(name)
    if not out:
        what = f"--modules '{modules}'" if modules else "the default attention/MLP filter (pass --modules REGEX)"
        raise WeightopsError(f"no 2-D weight of {base.path} matches {what}" +
                             (" among the adapter's targets" if getattr(source, "kind", "") == "lora" else ""))
    return out


def _whole(src, name: str) -> torch.Tensor:
    info = src.infos[name] if name not in getattr(src, "replaced", {}) else src.replaced[name]
    return src.read(name, 0, info.numel)


def _effective_rank(S: torch.Tensor) -> float:
    """exp(entropy of σ/Σσ) (Roy & Vetterli 2007)."""
    S = S.double()
    tot = S.sum()
    if float(tot) <= 0:
        return 0.0
    p = S[S > 0] / tot
    return float(torch.exp(-(p * p.log()).sum()))


@dataclass
class MatrixResult:
    name: str
    layer: int | None
    module: str
    shape: tuple[int, int]
    solver: str
    iterations: int
    residual: float
    sigma: list[float]
    best_cos: list[float]
    best_base_rank: list[int]
    stats: dict
    seconds: float
    err: list[float] = field(default_factory=list)
    vectors: tuple | None = None  # (U m×k, S k, V n×k) fp32 when kept
    detail: dict | None = None

    def intruders(self, eps: float) -> list[int]:
        return [j for j, c in enumerate(self.best_cos) if c < eps]

    def to_json(self, opts: Options) -> dict:
        return {
            "name": self.name, "layer": self.layer, "module": self.module, "shape": list(self.shape),
            "count": len(self.intruders(opts.eps)),
            "counts": {f"{e:g}": len(self.intruders(e)) for e in opts.grid},
            "intruders": [{"rank": j + 1, "sigma": self.sigma[j], "best_cos": self.best_cos[j],
                           "base_rank": self.best_base_rank[j] + 1} for j in self.intruders(opts.eps)],
            "sigma": self.sigma, "best_cos": self.best_cos, "best_base_rank": [i + 1 for i in self.best_base_rank],
            **self.stats,
            "solver": self.solver, "iterations": self.iterations, "residual": self.residual,
            "cos_error_bound": max(self.err) if self.err else 0.0, "seconds": round(self.seconds, 4),
        }


def _ambiguous(best: torch.Tensor, err: torch.Tensor, grid: list[float]) -> bool:
    g = torch.tensor(grid, dtype=torch.float32)
    return bool(((best[:, None] - g[None, :]).abs() <= err[:, None] + REFERENCE_MARGIN).any())


@contextlib.contextmanager
def _num_threads(n: int, enabled: bool = True):
    """torch's intra-op thread count set to n for the block (process-wide: only with one worker)."""
    old = torch.get_num_threads()
    if enabled and n != old:
        torch.set_num_threads(n)
    try:
        yield old
    finally:
        if enabled and n != old:
            torch.set_num_threads(old)


def analyse_matrix(name: str, W0_flat: torch.Tensor, shape, *, W: torch.Tensor | None = None,
                   factors: tuple[torch.Tensor, torch.Tensor] | None = None, base_svd: _svd.SVD,
                   opts: Options) -> MatrixResult:
    """One matrix: W given densely, or as W0 + Bs·A (`factors` = (Bs, A), Bs already scaled).

    Everything but a full SVD runs on one thread: the work is chains of small ops (n×p products,
    QR, p×p SVDs, norms), where thread barriers cost more than they save (2048², top-10: 0.2 s on
    one thread vs 1.1 s on two, on a busy 2-core machine); --workers parallelises across matrices.
    """
    with _num_threads(1, opts.workers == 1) as threads:
        return _analyse_matrix(name, W0_flat, shape, W, factors, base_svd, opts, threads)


def _analyse_matrix(name, W0_flat, shape, W, factors, base_svd, opts, threads) -> MatrixResult:
    t0 = time.perf_counter()
    m, n = shape
    W0 = W0_flat.reshape(shape).float()
    d = min(m, n)
    k = min(opts.top_k, d)
    gen = torch.Generator().manual_seed((opts.seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF)
    if W is None:
        W = W0 + factors[0].float() @ factors[1].float()
    W = W.float()
    solver = opts.solver
    if solver == "auto":
        solver = "exact" if d <= SMALL else "fast"
    if solver == "exact":
        with _num_threads(threads, opts.workers == 1):  # LAPACK does use the threads
            top = _svd.topk_exact(W, base_svd, k)
    elif factors is not None:
        top = _svd.topk_lowrank(base_svd, factors[0], factors[1], k, generator=gen)
    else:
        top = _svd.topk_dense(W, base_svd, k, generator=gen, W0=W0)
    best, arg = top.cos.max(dim=0)
    if top.solver == "subspace" and top.certified and _ambiguous(best, top.err, opts.grid):
        # Iterate on to the fp32 rounding floor from where we are; only then pay for the full SVD.
        more = _svd.topk_dense(W, base_svd, k, tol=1e-8, generator=gen, start=top.V, W0=W0)
        more.iterations += top.iterations
        top = more
        best, arg = top.cos.max(dim=0)
    if top.solver != "exact" and (not top.certified or _ambiguous(best, top.err, opts.grid)):
        why = ("a cosine within its error bound of an ε" if top.certified else
               "the rest of the spectrum could not be bounded below the top k found")
        with _num_threads(threads, opts.workers == 1):
            top = _svd.topk_exact(W, base_svd, k)
        top.solver = f"exact (fallback: {why})"
        best, arg = top.cos.max(dim=0)
    dW = W - W0
    s0, s1 = float(base_svd.S[0]) if d else 0.0, float(top.S[0]) if k else 0.0
    fro0, fro, dfro = float(W0.norm()), float(W.norm()), float(dW.norm())
    stats = {
        "sigma_max_base": s0,
        "sigma_max": s1,
        "spectral_norm_ratio": s1 / s0 if s0 > 0 else math.inf,
        "delta_fro": dfro,
        "delta_rel": dfro / fro0 if fro0 > 0 else math.inf,
        "stable_rank_base": fro0 ** 2 / s0 ** 2 if s0 > 0 else 0.0,
        "stable_rank": fro ** 2 / s1 ** 2 if s1 > 0 else 0.0,
        "effective_rank_base": _effective_rank(base_svd.S),
    }
    vectors = None
    if opts.keep_vectors and bool((best < opts.eps).any()):
        U, V = (top.vectors() if isinstance(top, _svd.LowRankTopK) else (top.U, top.V))
        vectors = (U.float(), top.S.float(), V.float())
    K = min(opts.detail_k, d)
    detail = {"sigma_base": base_svd.S[:K].tolist(), "cos": top.cos[:K].T.tolist()}
    return MatrixResult(name, *layer_and_module(name), (m, n), top.solver, top.iterations, top.residual,
                        top.S.tolist(), best.tolist(), arg.tolist(), stats, time.perf_counter() - t0,
                        top.err.tolist(), vectors, detail)


def analyse_source(base: Checkpoint, source, opts: Options, cache: _svd.SVDCache, *, label: str = "",
                   quiet: bool = False) -> tuple[dict, list[MatrixResult]]:
    """Every selected matrix of one target (a Checkpoint or LoraAdapter on `base`), one matrix at a time."""
    names = select_matrices(base, source, opts.modules)
    t0 = time.perf_counter()

    io_lock = threading.Lock()  # readers are not thread-safe; only the arithmetic runs in parallel

    def one(name: str) -> MatrixResult:
        info = base.infos[name]
        f = source.factors.get(name) if getattr(source, "kind", "") == "lora" and name not in source.replaced else None
        with io_lock:
            flat0 = base.read(name, 0, info.numel).clone()
            base.release(name, 0, info.numel)
            if f is not None:
                B, A = f.factors()
                W = None
            else:
                W = _whole(source, name).reshape(info.shape).clone()
                source.release(name, 0, info.numel)
        svd0 = cache.get(flat0, info.shape)
        if f is not None:
            return analyse_matrix(name, flat0, info.shape, factors=(B * f.scale, A), base_svd=svd0, opts=opts)
        return analyse_matrix(name, flat0, info.shape, W=W, base_svd=svd0, opts=opts)

    from tqdm.auto import tqdm

    with tqdm(total=len(names), desc=f"intruders {label}".strip(), unit="matrix", disable=quiet, delay=1.0,
              dynamic_ncols=True, file=sys.stderr) as bar:
        if opts.workers > 1:
            # workers share the cores rather than oversubscribe them
            with _num_threads(max(1, torch.get_num_threads() // opts.workers)), ThreadPoolExecutor(opts.workers) as pool:
                results = []
                for r in pool.map(one, names):
                    results.append(r)
                    bar.update(1)
        else:
            results = []
            for name in names:
                results.append(one(name))
                bar.update(1)
    summary = summarise(results, opts)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary, results


def summarise(results: list[MatrixResult], opts: Options) -> dict:
    by_layer: dict[str, int] = {}
    by_module: dict[str, int] = {}
    solvers: dict[str, int] = {}
    for r in results:
        c = len(r.intruders(opts.eps))
        by_layer[str(r.layer)] = by_layer.get(str(r.layer), 0) + c
        by_module[r.module] = by_module.get(r.module, 0) + c
        key = r.solver.split(" ")[0] + (" (fallback)" if "fallback" in r.solver else "")
        solvers[key] = solvers.get(key, 0) + 1
    return {
        "total": sum(len(r.intruders(opts.eps)) for r in results),
        "counts_vs_eps": {f"{e:g}": sum(len(r.intruders(e)) for r in results) for e in opts.grid},
        "matrices_with_intruders": sum(1 for r in results if r.intruders(opts.eps)),
        "n_matrices": len(results),
        "by_layer": by_layer,
        "by_module": by_module,
        "solvers": solvers,
    }


def _source_json(src) -> dict:
    out = {"path": str(src.path), "kind": src.kind}
    if src.kind == "lora":
        cfg = src.config
        out["adapter"] = {"r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "use_rslora": bool(cfg.get("use_rslora")),
                          "scales": sorted({round(f.scale, 6) for f in src.factors.values()}),
                          "adapted_matrices": len(src.factors)}
    return out


def analyse(base: str, targets: list[str], *, labels: list[str] | None = None, opts: Options | None = None,
            detail: str | None = None, quiet: bool = False, command: list[str] | None = None,
            _keep_results: bool = False):
    """The intruder report of one or more targets (checkpoints or LoRA adapters) against `base`.

    Returns the report dict (what report.json holds); with `_keep_results`
    also the per-target MatrixResult lists (vectors kept if opts.keep_vectors).
    """
    opts = opts or Options()
    opts.validate()
    if not targets:
        raise WeightopsError("give at least one target (a fine-tuned checkpoint or a LoRA adapter)")
    labels = list(labels) if labels else [_default_label(t) for t in targets]
    if len(labels) != len(targets):
        raise WeightopsError(f"--labels has {len(labels)} names for {len(targets)} targets")
    if is_adapter_dir(base):
        raise WeightopsError(f"{base}: the base must be a checkpoint, not an adapter")
    t0 = time.perf_counter()
    base_ck = Checkpoint(base)
    cache_root = _svd.default_cache_dir() if opts.cache_dir == "default" else opts.cache_dir
    cache = _svd.SVDCache(cache_root)
    sources = [open_source(t, base_ck) for t in targets]
    out_targets, kept = [], []
    for label, src in zip(labels, sources):
        summary, results = analyse_source(base_ck, src, opts, cache, label=label, quiet=quiet)
        out_targets.append({"label": label, **_source_json(src), **summary,
                            "matrices": [r.to_json(opts) for r in results]})
        kept.append(results)
    chosen = _choose_detail(kept, detail, opts.eps)
    report = {
        "weightops_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "definition": "intruder: one of the top-k left singular vectors of W whose max |cos| with all left "
                      "singular vectors of W0 is < eps (LoRA: W = W0 + scale*B*A)",
        "params": {"top_k": opts.top_k, "eps": opts.eps, "eps_grid": opts.grid, "modules": opts.modules or DEFAULT_MODULES,
                   "solver": opts.solver, "seed": opts.seed},
        "base": {"path": str(base_ck.path), "files": base_ck.file_hashes()},
        "cache": {"dir": str(cache_root) if cache_root else None, "hits": cache.hits, "misses": cache.misses},
        "targets": out_targets,
        "detail": _detail_json(kept, labels, chosen),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    for s in sources:
        s.close()
    base_ck.close()
    return (report, kept) if _keep_results else report


def _default_label(path: str) -> str:
    p = Path(path)
    return p.stem if p.suffix == ".safetensors" else p.name


def _choose_detail(kept: list[list[MatrixResult]], detail: str | None, eps: float) -> str | None:
    if not kept or not kept[0]:
        return None
    names = [r.name for r in kept[0]]
    if detail is not None:
        hits = [n for n in names if detail == n] or [n for n in names if re.search(detail, n)]
        if not hits:
            raise WeightopsError(f"--plot-matrix '{detail}' matches no analysed matrix (e.g. {names[0]})")
        return hits[0]
    # The matrix with the most intruders at ε in any target (the first such), else the first matrix.
    best = max(((len(r.intruders(eps)), -i, r.name) for rs in kept for i, r in enumerate(rs)), default=None)
    return best[2] if best and best[0] > 0 else names[0]


def _detail_json(kept, labels, chosen) -> dict | None:
    if chosen is None:
        return None
    out = {"name": chosen, "targets": []}
    for label, rs in zip(labels, kept):
        for r in rs:
            if r.name == chosen:
                out["sigma_base"] = r.detail["sigma_base"]
                out["targets"].append({"label": label, "sigma": r.sigma, "best_cos": r.best_cos,
                                       "best_base_rank": [i + 1 for i in r.best_base_rank], "cos": r.detail["cos"]})
    return out
