"""`prune` and `apply_delta`: the Python API behind `weightops prune | apply-delta`.

prune() resolves the knobs (q selection, calibration), then writes either a
full model (through `run_streaming`) or a compact sparse delta (indices +
pruned values, `weightops.sparse.format`), and logs every choice in the
manifest under "dpp".
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightops.dpp import analytic_q
from weightops.dpp.rules import METHODS, RULES, SCOPES, PruneParams, check_q, check_rate, della_epsilon
from weightops.errors import WeightopsError, check_finite

Q_BY = ("proxy", "metric", "analytic")
FORMATS = ("model", "delta")
ETA_RANGE = (0.1, 1.1, 0.1)  # the eta grid when it is tuned (README values 0.27-1.01)


@dataclass
class PruneResult:
    out: Path
    format: str
    seconds: float
    kept: int  # delta elements kept (non-zero after pruning)
    total: int  # delta elements considered
    bytes_written: int
    finetuned_bytes: int
    dpp: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        frac = self.kept / self.total if self.total else 0.0
        return (f"kept {self.kept:,} of {self.total:,} delta elements ({frac:.2%}); wrote {self.bytes_written / 1e6:.1f} MB"
                f" ({self.bytes_written / max(self.finetuned_bytes, 1):.1%} of the fine-tuned checkpoint's "
                f"{self.finetuned_bytes / 1e6:.1f} MB)")


def _float_q(q) -> float | None:
    if q is None or (isinstance(q, str) and q == "auto"):
        return None
    try:
        return float(q)
    except (TypeError, ValueError):
        raise WeightopsError(f"--q must be a number or 'auto', got {q!r}") from None


def _check_knobs(method, rate, q, q_by, scope, epsilon, calib_data, fmt):
    if method not in METHODS:
        raise WeightopsError(f"unknown pruning method '{method}'; choose from {', '.join(METHODS)}")
    rate = check_rate(rate)
    if fmt not in FORMATS:
        raise WeightopsError(f"--format must be model or delta, got {fmt}")
    if method != "darex-q" and (q is not None or q_by is not None):
        raise WeightopsError("--q and --q-by are only used with --method darex-q")
    if q_by is not None and q_by not in Q_BY:
        raise WeightopsError(f"--q-by must be one of {', '.join(Q_BY)}, got {q_by}")
    if scope is not None and scope not in SCOPES.get(method, ()):
        allowed = SCOPES.get(method)
        raise WeightopsError(f"--scope {scope} is not valid for {method}" +
                             (f" (choose {', '.join(allowed)})" if allowed else " (it has no scope)"))
    if epsilon is not None and method != "della":
        raise WeightopsError("--epsilon is only used with --method della")
    if method == "della":
        della_epsilon(rate, epsilon)
    if method == "wanda" and calib_data is None:
        raise WeightopsError("wanda needs calibration inputs: --calib-data FILE (one text per line) or zoo:<task>")
    return rate


def prune(base, finetuned, *, out, method: str = "dare", rate: float = 0.9, q=None, q_by: str | None = None,
          metric=None, proxy_data=None, calib_data=None, max_inputs: int = 64, max_len: int = 128,
          eta: float | None = None, gamma: float = analytic_q.GAMMA, stop_frac: float = analytic_q.STOP_FRAC,
          q_search: str = "grid", q_lo: float | None = None, q_hi: float | None = None, q_step: float | None = None,
          scope: str | None = None, epsilon: float | None = None, seed: int = 0, keep: str | None = None,
          exclude: str | None = None, format: str = "model", dtype: str | None = None, shard_size="5GB",
          block_size: int | None = None, threads: int | None = None, kernels: str = "auto", force: bool = False,
          quiet: bool = False, command: list[str] | None = None) -> PruneResult:
    """Prune the delta of `finetuned` against `base`; see `weightops prune --help` and docs/dpp.md."""
    t0 = time.perf_counter()
    check_finite(rate=rate, q=_float_q(q), eta=eta, gamma=gamma, stop_frac=stop_frac, q_lo=q_lo, q_hi=q_hi,
                 q_step=q_step, epsilon=epsilon)
    rate = _check_knobs(method, rate, q, q_by, scope, epsilon, calib_data, format)
    if keep is not None:
        try:
            re.compile(keep)
        except re.error as e:
            raise WeightopsError(f"--keep is not a valid regex ({e})") from None
    if threads:
        torch.set_num_threads(int(threads))
    scope = scope or {"magnitude": "tensor", "wanda": "row"}.get(method)
    params = PruneParams(rate=rate, seed=seed, scope=scope, epsilon=epsilon, keep=keep)
    dpp: dict = {"method": method, "rate": rate, "seed": seed}
    if method == "della":
        params.epsilon = della_epsilon(rate, epsilon)
    if method == "wanda":
        from weightops.dpp.calibration import calibrate
        from weightops.dpp.q_search import read_texts
        from weightops.io.checkpoint import Checkpoint

        texts = read_texts(calib_data)[:max_inputs]
        stats = calibrate(finetuned, texts, max_len=max_len, weight_names=list(Checkpoint(finetuned).infos))
        params.norms = stats.norm
        dpp["calibration"] = {"data": str(calib_data), **stats.as_dict()}
    if method == "darex-q":
        qf = _float_q(q)
        if qf is not None:
            if q_by is not None:
                raise WeightopsError("give either --q VALUE or --q auto with --q-by, not both")
            params.q = check_q(qf, rate)
            dpp["q"] = {"by": "given", "value": params.q}
        else:
            params.q, params.q_map, dpp["q"] = select_q(
                base, finetuned, rate, q_by=q_by, metric=metric, proxy_data=proxy_data, calib_data=calib_data,
                max_inputs=max_inputs, max_len=max_len, eta=eta, gamma=gamma, stop_frac=stop_frac, how=q_search,
                lo=q_lo, hi=q_hi, step=q_step, seed=seed, keep=keep, quiet=quiet)
    elif any(v is not None for v in (q_lo, q_hi, q_step, eta)):
        raise WeightopsError("--q-lo/--q-hi/--q-step/--eta are only used with --method darex-q")
    if format == "model":
        res = _write_model(base, finetuned, params, method, dpp, out=out, dtype=dtype, shard_size=shard_size,
                           block_size=block_size, kernels=kernels, exclude=exclude, force=force, quiet=quiet,
                           command=command)
    else:
        res = _write_delta(base, finetuned, params, method, dpp, out=out, block_size=block_size, kernels=kernels,
                           exclude=exclude, force=force, quiet=quiet, command=command)
    res.seconds = time.perf_counter() - t0
    return res


def _sources(base, finetuned):
    from weightops.io.checkpoint import Checkpoint, open_source

    b = Checkpoint(base)
    return b, open_source(finetuned, b)


def _ft_bytes(ft) -> int:
    return sum(i.nbytes for i in ft.infos.values())


def _write_model(base, finetuned, params, method, dpp, *, out, dtype, shard_size, block_size, kernels, exclude,
                 force, quiet, command) -> PruneResult:
    from weightops.engine import run_streaming

    b, ft = _sources(base, finetuned)
    log = {**dpp, "kept": 0, "total": 0}  # filled in as blocks go by; the manifest is written at the end
    counter = _Counting(RULES[method], log)
    res = run_streaming(counter, params, b, [ft], out=out, dtype=dtype, shard_size=shard_size, block_size=block_size,
                        kernels=kernels, exclude=exclude, force=force, quiet=quiet, command=command,
                        manifest_extra={"method": counter.name, "params": params.as_dict(), "seed": params.seed,
                                        "dpp": log})
    return PruneResult(res.out, "model", res.seconds, log["kept"], log["total"], res.bytes_written, _ft_bytes(ft),
                       log, res.warnings)


class _Counting:
    """Wraps a Prune method to count the kept (changed) delta elements as blocks go by."""

    def __init__(self, method, log: dict):
        self.m, self.log = method, log

    def __getattr__(self, k):
        return getattr(self.m, k)

    def merge_block(self, job, p, st, start, base, models):
        y = self.m.merge_block(job, p, st, start, base, models)
        self.log["kept"] += int((y != base.float().reshape(y.shape)).sum())
        self.log["total"] += y.numel()
        return y


def _write_delta(base, finetuned, params, method, dpp, *, out, block_size, kernels, exclude, force, quiet,
                 command) -> PruneResult:
    """indices + pruned values v per tensor (θ = fl(θ0 + v) exactly); tensors not written stay at θ0."""
    from weightops import ops
    from weightops.engine import DEFAULT_BLOCK_SIZE, _progress, plan_tensors
    from weightops.methods.base import TensorJob
    from weightops.sparse.format import SparseWriter

    ops.use_kernels(kernels)
    b, ft = _sources(base, finetuned)
    plan, notes = plan_tensors(b, [ft], out_dtype=None, allow_missing=False, allow_dtype_mix=False, exclude=exclude)
    bs = int(block_size or DEFAULT_BLOCK_SIZE)
    m = RULES[method]

    def read_block(job, start, stop, which=None):
        return b.read(job.name, start, stop), [ft.read(job.name, start, stop)]

    jobs = [TensorJob(pt.name, pt.shape, pt.out_dtype, b, [ft], bs, read_block) for pt in plan if pt.action == "merge"]
    state = m.prepare_model(jobs, params)
    manifest = {"command": command, "method": m.name,
                "params": params.as_dict(), "dpp": dpp,
                "sources": [{"role": "base", "path": str(b.path), "files": b.file_hashes()},
                            {"role": "finetuned", "path": str(ft.path), "files": ft.file_hashes()}]}
    kept = total = 0
    with SparseWriter(out, "delta", manifest, force=force) as w, \
            _progress(sum(b.infos[j.name].nbytes * 2 for j in jobs), quiet, m.name) as bar:
        for job in jobs:
            st = m.prepare(job, params, state)
            w.begin(job.name, job.shape, job.out_dtype, value_dtype=torch.float32)
            for start, stop in job.ranges():
                base_blk, (x,) = read_block(job, start, stop)
                v = m.delta_block(job, params, st, start, base_blk, x)
                if not bool(torch.isfinite(v).all()):
                    raise WeightopsError(f"NaN/Inf in the pruned delta of '{job.name}'")
                idx = v.nonzero().reshape(-1)
                w.add(idx + start, v[idx])
                kept += idx.numel()
                total += v.numel()
                bar.update(2 * base_blk.numel() * base_blk.element_size())
                b.release(job.name, start, stop)
                ft.release(job.name, start, stop)
            w.end()
        w.extra["dpp"] = {**dpp, "kept": kept, "total": total}
        path = w.commit()
    nbytes = sum(f.stat().st_size for f in Path(path).iterdir())
    return PruneResult(Path(path), "delta", 0.0, kept, total, nbytes, _ft_bytes(ft), {**dpp, "kept": kept, "total": total},
                       notes)


def apply_delta(base, delta, *, out, dtype=None, shard_size="5GB", block_size=None, force=False, quiet=False,
                command=None):
    """Restore a model from its base and a sparse delta written by `prune --format delta`."""
    from weightops.sparse.apply import apply_sparse_delta

    return apply_sparse_delta(base, delta, out, dtype=dtype, shard_size=shard_size, block_size=block_size,
                              force=force, quiet=quiet, command=command)


# -- q selection ---------------------------------------------------------------------------

def select_q(base, finetuned, rate, *, q_by=None, metric=None, proxy_data=None, calib_data=None, max_inputs=64,
             max_len=128, eta=None, gamma=analytic_q.GAMMA, stop_frac=analytic_q.STOP_FRAC, how="grid", lo=None,
             hi=None, step=None, seed=0, keep=None, quiet=True, model_index=0):
    """(global q, per-tensor q map or None, log) for DAREx-q; see docs/dpp.md."""
    from weightops.io.checkpoint import is_adapter_dir

    if q_by is None:
        q_by = "metric" if metric is not None else "proxy" if proxy_data is not None else \
            "analytic" if calib_data is not None else None
    if q_by is None:
        raise WeightopsError("darex-q needs --q VALUE, or --q auto with --proxy-data FILE (unlabelled proxy), "
                             "--metric SPEC (validation metric) or --calib-data FILE (analytic per-layer q)")
    if is_adapter_dir(finetuned):
        raise WeightopsError("q search needs a full fine-tuned checkpoint; merge the LoRA adapter first "
                             "(weightops merge ADAPTER --base BASE --out DIR) or give --q VALUE")
    if q_by == "proxy" and proxy_data is None:
        raise WeightopsError("--q-by proxy needs --proxy-data FILE (unlabelled inputs, one per line) or zoo:<task>")
    if q_by == "metric" and metric is None:
        raise WeightopsError("--q-by metric needs --metric SPEC (a callable, module:function, cmd:..., zoo:<task>)")
    if q_by == "analytic" and calib_data is None:
        raise WeightopsError("--q-by analytic needs --calib-data FILE (calibration inputs) or zoo:<task>")
    lo = 1.0 - rate if lo is None else lo
    hi = 1.0 if hi is None else hi
    if q_by != "analytic":
        check_q(lo, rate, "--q-lo")
        check_q(hi, rate, "--q-hi")
        if lo > hi:
            raise WeightopsError(f"--q-lo {lo:g} is above --q-hi {hi:g}")
    scorer, scorer_log = _scorer(base, finetuned, rate, metric if q_by != "proxy" else None,
                                 proxy_data if q_by != "metric" else None, max_inputs, max_len, seed, keep, model_index)
    log: dict = {"by": q_by, **scorer_log}
    from tqdm.auto import tqdm

    bar = tqdm(desc="η search" if q_by == "analytic" else "q search", unit="candidate", disable=quiet, delay=1.0,
               dynamic_ncols=True, file=sys.stderr)
    try:
        return _select(base, finetuned, rate, q_by, _with_progress(scorer, bar) if scorer else None, log, calib_data,
                       max_inputs, max_len, eta, gamma, stop_frac, how, lo, hi, step)
    finally:
        bar.close()


def _select(base, finetuned, rate, q_by, scorer, log, calib_data, max_inputs, max_len, eta, gamma, stop_frac, how,
            lo, hi, step):
    from weightops.dpp import q_search as qs

    if q_by == "analytic":
        from weightops.dpp.calibration import calibrate
        from weightops.io.checkpoint import Checkpoint

        bck, fck = Checkpoint(base), Checkpoint(finetuned)
        stats = calibrate(finetuned, qs.read_texts(calib_data)[:max_inputs], max_len=max_len, weight_names=list(fck.infos))
        log["calibration"] = {"data": str(calib_data), **stats.as_dict()}

        def qmap(e):
            return analytic_q.tensor_q_map(bck, fck, stats.mean, rate, eta=e, gamma=gamma, stop_frac=stop_frac)
        if eta is None and scorer is not None:
            res = qs.search(lambda e: scorer(None, qmap(e)), ETA_RANGE[0], ETA_RANGE[1], how=how,
                            step=ETA_RANGE[2] if step is None else step)
            eta = res.x
            log["eta_search"] = res.as_dict()
        elif eta is None:
            eta = analytic_q.ETA
            log["eta_note"] = "eta not tuned (no --proxy-data or --metric): the reference default 0.45"
        qm = qmap(eta)
        log.update(eta=eta, gamma=gamma, stop_frac=stop_frac, q_mean=sum(qm.values()) / len(qm))
        return None, qm, log
    if step is None:
        step = (hi - lo) / 10 if hi > lo else 1.0
    res = qs.search(lambda q: scorer(q, None), lo, hi, how=how, step=step)
    log.update(res.as_dict())
    return res.x, None, log


def _with_progress(scorer, bar):
    """Count candidates on `bar`, showing the last value and score."""
    def score(q, q_map):
        s = scorer(q, q_map)
        bar.update(1)
        bar.set_postfix_str(f"q={q:.4g} score={s:.4g}" if q is not None else f"score={s:.4g}")
        return s
    return score


def _scorer(base, finetuned, rate, metric, proxy_data, max_inputs, max_len, seed, keep, model_index=0):
    """score(q, q_map) -> higher is better, for candidate DAREx-q models, and what it is."""
    from weightops.dpp import q_search as qs

    if metric is not None:
        from weightops.engine import run_streaming
        from weightops.evaluate import make_evaluator, scratch_dir

        ev = make_evaluator(metric)

        def score(q, q_map):
            b, ft = _sources(base, finetuned)
            params = PruneParams(rate=rate, seed=seed, q=q, q_map=q_map, keep=keep, model_index=model_index)
            with scratch_dir(prefix="weightops-darexq-") as d:
                run_streaming(RULES["darex-q"], params, b, [ft], out=d / "m", force=True, quiet=True)
                return float(ev(d / "m"))
        return score, {"metric": str(metric)}
    if proxy_data is not None:
        from weightops.dpp.inmemory import PrunedModel

        decoder = qs.is_decoder(finetuned)
        model = qs.load_for_proxy(finetuned, decoder)
        proxy = qs.make_proxy(model, finetuned, qs.read_texts(proxy_data)[:max_inputs], decoder, max_len)
        pm = PrunedModel(model, base, finetuned)

        def score(q, q_map):
            pm.apply("darex-q", PruneParams(rate=rate, seed=seed, q=q, q_map=q_map, keep=keep, model_index=model_index))
            return -proxy()
        return score, {"proxy": proxy.name, "proxy_data": str(proxy_data), "inputs": int(proxy.mask.shape[0])}
    return None, {}
