"""`weightops merge | inspect | diff | verify`."""
from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from weightops.cli import app

METHODS_HELP = ("linear (soup), task_arithmetic, ties, dare_linear (alias dare), dare_ties, breadcrumbs, "
                "slerp (2 models), model_stock; mergekit's breadcrumbs_ties, della, della_linear, sce, nuslerp, "
                "multislerp, karcher, nearswap, arcee_fusion, ram, ramplus_tl, passthrough (docs/merging.md)")


def _floats(text: Optional[str], what: str) -> Optional[list[float]]:
    if text is None:
        return None
    from weightops.errors import WeightopsError, check_finite

    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise WeightopsError(f"{what} must be comma-separated numbers, got '{text}'") from None
    check_finite(**{what.lstrip("-").replace("-", "_"): values})
    return values


@app.command()
def merge(
    models: List[str] = typer.Argument(..., help="Fine-tuned checkpoints: HF model dirs, .safetensors files or PEFT LoRA adapter dirs."),
    out: str = typer.Option(..., "--out", "-o", help="Output directory (written atomically; must not exist unless --force)."),
    base: Optional[str] = typer.Option(None, "--base", "-b", help="The model the others were fine-tuned from (θ0)."),
    method: str = typer.Option("linear", "--method", "-m", help=f"Merge method: {METHODS_HELP}."),
    weights: Optional[str] = typer.Option(None, help="Per-model weights, comma-separated (default: 1 each; linear normalises)."),
    lam: Optional[float] = typer.Option(None, "--lambda", help="λ scaling the merged task vector (default 1)."),
    density: Optional[float] = typer.Option(None, help="ties/dare_ties/breadcrumbs: fraction of |δ| KEPT by the magnitude trim (ties: 0.2)."),
    trim_scope: Optional[str] = typer.Option(None, help="ties: 'global' (exact threshold over the whole model, the paper's; default) or 'tensor' (mergekit)."),
    gamma: Optional[float] = typer.Option(None, help="breadcrumbs: fraction of the largest |δ| removed (default 0.01)."),
    drop_rate: Optional[float] = typer.Option(None, help="DARE: probability p of DROPPING each delta element (default 0.9). mergekit's density is 1 − p."),
    rescale: Optional[str] = typer.Option(None, help="DARE rescale of kept deltas: dare = 1/(1−p) (default), darex-q = 1/q, l1 = mergekit's L1-norm match, none."),
    q: Optional[str] = typer.Option(None, help="DAREx-q divisor, 1−p ≤ q ≤ 1 (with --rescale darex-q): one value, one per model (comma-separated), or 'auto' (per model, by --q-by; see docs/dpp.md)."),
    q_by: Optional[str] = typer.Option(None, help="--q auto: proxy (needs --proxy-data) or metric (needs --metric)."),
    proxy_data: Optional[str] = typer.Option(None, help="--q auto: unlabelled inputs (text file, one per line, or zoo:<task>)."),
    metric: Optional[str] = typer.Option(None, help="--q auto: validation metric spec (module:function, cmd:..., zoo:<task>), higher is better."),
    t: Optional[float] = typer.Option(None, help="slerp: interpolation factor from the first model (0) to the second (1); default 0.5."),
    normalize: Optional[bool] = typer.Option(None, "--normalize/--no-normalize", help="linear, multislerp, della*, breadcrumbs_ties: divide by the (agreeing) weights' sum (mergekit's defaults)."),
    epsilon: Optional[str] = typer.Option(None, help="della/della_linear: keep-probability spread around density (0.15; one or one per model); ram/ramplus_tl: |δ| threshold (1e-5)."),
    select_topk: Optional[float] = typer.Option(None, help="sce: fraction of elements kept by delta variance across models (default 1: all)."),
    nuslerp_flatten: Optional[bool] = typer.Option(None, "--nuslerp-flatten/--no-nuslerp-flatten", help="nuslerp: whole tensors (default) or per row/column."),
    nuslerp_row_wise: Optional[bool] = typer.Option(None, "--nuslerp-row-wise/--no-nuslerp-row-wise", help="nuslerp without flatten: slerp columns (row-wise vectors along axis 0) instead of rows."),
    max_iter: Optional[int] = typer.Option(None, help="karcher: iterations (default 10)."),
    tol: Optional[float] = typer.Option(None, help="karcher: convergence tolerance (default 1e-5)."),
    filter_wise: Optional[bool] = typer.Option(None, "--filter-wise/--no-filter-wise", help="model_stock: one t per row (default off)."),
    eps: Optional[float] = typer.Option(None, help="multislerp: added to norms (default 1e-8)."),
    r: Optional[float] = typer.Option(None, "--r", help="ramplus_tl: boost strength r (default 0.1)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="ramplus_tl: cap α of the overlap ratio (default 0.2)."),
    scale: Optional[float] = typer.Option(None, help="passthrough: multiply the model's tensors."),
    no_card: bool = typer.Option(False, "--no-card", help="Write no README.md model card."),
    seed: int = typer.Option(0, help="Seed of the DARE masks (mask = f(seed, model index, tensor name, element index))."),
    dtype: Optional[str] = typer.Option(None, help="Output dtype: auto (the base's; block-scaled FP8 → bfloat16), float32, bfloat16, float16, float8_e4m3fn (re-quantize an FP8 checkpoint's FP8 weights)."),
    shard_size: str = typer.Option("5GB", help="Maximum shard size of the output (e.g. 5GB, 500MB)."),
    block_size: Optional[int] = typer.Option(None, help="Elements per block (default 4194304); bounds memory, never changes results."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's)."),
    kernels: str = typer.Option("auto", help="auto | reference (pure torch) | native (C++ extension); results are bit-identical."),
    exclude: Optional[str] = typer.Option(None, help="Regex of tensor names to copy from the base instead of merging."),
    allow_missing: bool = typer.Option(False, help="Copy tensors some model lacks from the base and ignore tensors the base lacks."),
    allow_dtype_mix: bool = typer.Option(False, help="Merge models whose float dtypes differ (computed in fp32 anyway)."),
    clamp: bool = typer.Option(False, help="Clamp values outside the output dtype's range instead of failing."),
    strict: bool = typer.Option(False, help="Fail on NaN/Inf in the inputs instead of warning."),
    force: bool = typer.Option(False, help="Replace an existing output directory (only once the new one is complete)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
):
    """Merge fine-tuned models, tensor by tensor, streaming from disk.

    Example: weightops merge a b --base base --method dare --drop-rate 0.9 --out merged
    """
    from weightops import card
    from weightops.engine import merge as run_merge

    eps_vals = _floats(epsilon, "--epsilon")
    extra = dict(epsilon=(eps_vals[0] if eps_vals and len(eps_vals) == 1 else eps_vals), select_topk=select_topk,
                 nuslerp_flatten=nuslerp_flatten, nuslerp_row_wise=nuslerp_row_wise, max_iter=max_iter, tol=tol,
                 filter_wise=filter_wise, eps=eps, r=r, alpha=alpha, scale=scale)
    with card.disabled(no_card):
        res = run_merge(
        models, out=out, base=base, method=method, weights=_floats(weights, "--weights"), lam=lam, density=density,
        gamma=gamma, drop_rate=drop_rate, rescale=rescale,
        q=_darex_q(q, q_by, proxy_data, metric, models, base, drop_rate, rescale, seed, quiet), trim_scope=trim_scope, t=t, normalize=normalize,
        seed=seed, dtype=dtype, shard_size=shard_size, block_size=block_size, threads=threads, kernels=kernels,
        allow_missing=allow_missing, allow_dtype_mix=allow_dtype_mix, exclude=exclude, clamp=clamp, strict=strict,
        force=force, quiet=quiet, command=["weightops"] + sys.argv[1:], **extra,
        )
    for w in res.warnings:
        typer.echo(f"warning: {w}", err=True)
    if not quiet:
        gb = res.bytes_written / 1e9
        typer.echo(f"{res.manifest['method']}: wrote {res.out} ({len(res.manifest['outputs']['tensors'])} tensors, "
                   f"{gb:.3f} GB) in {res.seconds:.1f} s, read {res.bytes_read / 1e9:.3f} GB, kernels {res.manifest['kernels']}")


def _darex_q(q, q_by, proxy_data, metric, models, base, drop_rate, rescale, seed, quiet):
    """--q as given (one value or one per model), or chosen per model by weightops.dpp for --q auto."""
    from weightops.errors import WeightopsError

    if q != "auto":
        if q_by is not None or proxy_data is not None or metric is not None:
            raise WeightopsError("--q-by/--proxy-data/--metric are only used with --q auto")
        qs = _floats(q, "--q")
        return qs[0] if qs is not None and len(qs) == 1 else qs
    if rescale != "darex-q":
        raise WeightopsError("--q auto needs --rescale darex-q")
    if base is None:
        raise WeightopsError("--q auto needs --base")
    if q_by == "analytic":
        raise WeightopsError("merge takes a global q per model (--q-by proxy or metric); per-layer analytic q is "
                             "available in `weightops prune --method darex-q --q-by analytic`")
    from weightops.dpp.api import select_q

    p = 0.9 if drop_rate is None else drop_rate
    if not 0 <= p < 1:
        raise WeightopsError(f"--drop-rate must be in [0, 1), got {p}")
    out = []
    for i, m in enumerate(models):
        val, _, log = select_q(base, m, p, q_by=q_by, metric=metric, proxy_data=proxy_data, seed=seed, model_index=i)
        if not quiet:
            typer.echo(f"darex-q: model {i + 1}: q = {val:.4g} (by {log['by']}, {len(log['evaluated'])} candidates)", err=True)
        out.append(val)
    return out


@app.command()
def inspect(
    model: str = typer.Argument(..., help="A checkpoint dir, .safetensors file or LoRA adapter dir."),
    base: Optional[str] = typer.Option(None, help="For an adapter: its base, to resolve targets and scales."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    limit: int = typer.Option(50, help="Tensors to list (0: all)."),
):
    """Tensors, shapes, dtypes, sizes, parameter count (and LoRA config for adapters)."""
    from weightops.info import inspect as run

    r = run(model, base)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    typer.echo(f"{r['path']}: {r['kind']}, {r['parameters']:,} parameters, {r['bytes'] / 1e6:.1f} MB")
    if r["kind"] == "lora":
        typer.echo("config: " + ", ".join(f"{k}={v}" for k, v in r["config"].items() if v not in (None, {}, [])))
        rows = r.get("adapted") or r["tensors"]
    else:
        typer.echo("by dtype: " + ", ".join(f"{k} {v:,}" for k, v in r["parameters_by_dtype"].items()))
        rows = r["tensors"]
    shown = rows if limit == 0 else rows[:limit]
    width = max((len(x["name"]) for x in shown), default=4)
    for x in shown:
        extra = f"  scale {x['scale']:.4g} r {x['rank']}" if "scale" in x else f"  {x.get('dtype', '')}"
        typer.echo(f"  {x['name']:<{width}}  {str(x['shape']):<16}{extra}")
    if len(rows) > len(shown):
        typer.echo(f"  ... {len(rows) - len(shown)} more (--limit 0 lists all)")


@app.command()
def diff(
    a: str = typer.Argument(..., help="First checkpoint (e.g. the base)."),
    b: str = typer.Argument(..., help="Second checkpoint, or a LoRA adapter on A."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    top: int = typer.Option(20, help="Tensors to show, largest relative change first (0: all)."),
):
    """Per-tensor delta statistics of B − A: L2, relative L2, cosine, max |δ|, fraction changed."""
    from weightops.info import diff as run

    r = run(a, b)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    rows = sorted(r["tensors"], key=lambda x: -(x["rel_l2"] if x["rel_l2"] == x["rel_l2"] else 0))
    rows = rows if top == 0 else rows[:top]
    width = max((len(x["name"]) for x in rows), default=4)
    typer.echo(f"{'tensor':<{width}}  {'L2':>10} {'rel L2':>9} {'cosine':>9} {'max|δ|':>10} {'changed':>8}")
    for x in rows:
        typer.echo(f"{x['name']:<{width}}  {x['l2']:>10.4g} {x['rel_l2']:>9.3g} {x['cosine']:>9.6f} {x['max_abs']:>10.4g} {x['changed']:>8.1%}")
    typer.echo(f"total L2 {r['total_l2']:.4g} over {len(r['tensors'])} float tensors")
    if r["only_in_one"]:
        typer.echo(f"{len(r['only_in_one'])} tensor(s) are in only one of the two")


@app.command()
def verify(out: str = typer.Argument(..., help="A directory written by weightops.")):
    """Re-hash every tensor of a weightops output and compare with its manifest."""
    from weightops.info import verify as run

    r = run(out)
    if r["ok"]:
        typer.echo(f"ok: {r['tensors']} tensors match weightops.json")
        return
    for p in r["problems"]:
        typer.echo(f"error: {p}", err=True)
    raise typer.Exit(1)
