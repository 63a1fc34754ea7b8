"""`weightops prune | apply-delta | delta-stats | recommend-dpp` (delta-parameter pruning, docs/dpp.md)."""
from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from weightops.cli import app


@app.command()
def prune(
    base: str = typer.Option(..., "--base", "-b", help="The model FT was fine-tuned from (θ0)."),
    finetuned: str = typer.Option(..., "--finetuned", "-f", help="The fine-tuned checkpoint (or a LoRA adapter on BASE)."),
    out: str = typer.Option(..., "--out", "-o", help="Output directory (a model, or a sparse delta with --format delta)."),
    method: str = typer.Option("dare", "--method", "-m", help="dare | darex-q | magnitude | wanda | della."),
    rate: float = typer.Option(0.9, "--rate", "-p", help="Drop rate p in [0, 1): fraction of delta elements DROPPED."),
    q: Optional[str] = typer.Option(None, help="darex-q: the divisor q in [1-p, 1], or 'auto' to choose it (see --q-by)."),
    q_by: Optional[str] = typer.Option(None, help="darex-q auto: metric (validation, --metric) | proxy (unlabelled, --proxy-data) | analytic (per-layer, --calib-data)."),
    metric: Optional[str] = typer.Option(None, help="Validation metric, higher is better: module:function, file.py:function, 'cmd:<shell command>', zoo:<task>[:<split>]."),
    proxy_data: Optional[str] = typer.Option(None, help="Unlabelled inputs for the proxy: text file (one per line) or zoo:<task>."),
    calib_data: Optional[str] = typer.Option(None, help="Calibration inputs (wanda norms, analytic q): text file or zoo:<task>."),
    max_inputs: int = typer.Option(64, help="Use at most this many proxy/calibration inputs."),
    max_len: int = typer.Option(128, help="Token limit per input."),
    eta: Optional[float] = typer.Option(None, help="analytic q: η (default: tuned on the proxy/metric, else 0.45)."),
    gamma: float = typer.Option(0.95, help="analytic q: confidence γ of the bound."),
    stop_frac: float = typer.Option(0.8, help="analytic q: stop the scan once this fraction of rows passed their optimum."),
    q_search: str = typer.Option("grid", help="grid (the reference two-stage grid with early stop) | log (the same on a geometric grid: finds narrow optima near 1-p) | bounded (Brent)."),
    q_lo: Optional[float] = typer.Option(None, help="Lower search bound (default 1 - p)."),
    q_hi: Optional[float] = typer.Option(None, help="Upper search bound (default 1)."),
    q_step: Optional[float] = typer.Option(None, help="Coarse grid step (default (hi - lo)/10)."),
    scope: Optional[str] = typer.Option(None, help="magnitude: tensor (default) | global | row; wanda: row (default) | tensor."),
    epsilon: Optional[float] = typer.Option(None, help="della: keep probabilities span (1-p) ± ε by |δ| rank (default min(0.1, k/2, p/2))."),
    seed: int = typer.Option(0, help="Seed of the random masks (dare, darex-q, della)."),
    keep: Optional[str] = typer.Option(None, help="Regex of tensors kept from FT unpruned (e.g. 'classifier' as DAREx does)."),
    exclude: Optional[str] = typer.Option(None, help="Regex of tensors reset to the base."),
    format: str = typer.Option("model", "--format", help="model (a full checkpoint) | delta (indices + values; restore with apply-delta)."),
    dtype: Optional[str] = typer.Option(None, help="Output dtype (model format): auto, float32, bfloat16, float16."),
    shard_size: str = typer.Option("5GB", help="Maximum shard size of the output model."),
    block_size: Optional[int] = typer.Option(None, help="Elements per block; bounds memory, never changes results."),
    threads: Optional[int] = typer.Option(None, help="torch threads."),
    force: bool = typer.Option(False, help="Replace an existing output."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or summary."),
):
    """Prune the delta of a fine-tuned model: θ0 + prune(θft − θ0).

    Example: weightops prune --base B --finetuned FT --method darex-q --rate 0.99 --q auto --proxy-data texts.txt --out OUT
    """
    from weightops.dpp.api import prune as run

    res = run(base, finetuned, out=out, method=method, rate=rate, q=q, q_by=q_by, metric=metric, proxy_data=proxy_data,
              calib_data=calib_data, max_inputs=max_inputs, max_len=max_len, eta=eta, gamma=gamma, stop_frac=stop_frac,
              q_search=q_search, q_lo=q_lo, q_hi=q_hi, q_step=q_step, scope=scope, epsilon=epsilon, seed=seed, keep=keep,
              exclude=exclude, format=format, dtype=dtype, shard_size=shard_size, block_size=block_size, threads=threads,
              force=force, quiet=quiet, command=["weightops"] + sys.argv[1:])
    for w in res.warnings:
        typer.echo(f"warning: {w}", err=True)
    if not quiet:
        qlog = res.dpp.get("q")
        if qlog:
            what = (f"q = {qlog['value']:.4g}" if qlog.get("value") is not None
                    else f"per-layer q (mean {qlog.get('q_mean', float('nan')):.4g}, eta {qlog.get('eta')})")
            typer.echo(f"darex-q: {what} (by {qlog['by']})")
        typer.echo(f"{method} p={rate:g}: {res.out} ({res.format}); {res.summary()}; {res.seconds:.1f} s")


@app.command("apply-delta")
def apply_delta(
    base: str = typer.Argument(..., help="The base model the delta was pruned against."),
    delta: str = typer.Argument(..., help="A sparse delta written by `weightops prune --format delta`."),
    out: str = typer.Option(..., "--out", "-o", help="Output model directory."),
    dtype: Optional[str] = typer.Option(None, help="Output dtype: auto (the base's), float32, bfloat16, float16."),
    shard_size: str = typer.Option("5GB", help="Maximum shard size."),
    force: bool = typer.Option(False, help="Replace an existing output."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or summary."),
):
    """Restore a pruned model: θ0 + δ from a compact sparse delta (bit-identical to `prune --format model`)."""
    from weightops.dpp.api import apply_delta as run

    res = run(base, delta, out=out, dtype=dtype, shard_size=shard_size, force=force, quiet=quiet,
              command=["weightops"] + sys.argv[1:])
    for w in res.warnings:
        typer.echo(f"warning: {w}", err=True)
    if not quiet:
        typer.echo(f"wrote {res.out} ({res.bytes_written / 1e6:.1f} MB) in {res.seconds:.1f} s")


@app.command("delta-stats")
def delta_stats(
    base: str = typer.Argument(..., help="The base model."),
    finetuned: str = typer.Argument(..., help="The fine-tuned model (or LoRA adapter on BASE)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    top: int = typer.Option(20, help="Tensors to list, largest p99 |δ| first (0: all)."),
    exclude: Optional[str] = typer.Option(None, help="Regex of tensors to leave out."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Per-tensor delta statistics: mean, std, |δ| percentiles (exact), max, L2 and relative L2."""
    from weightops.dpp.stats import delta_stats as run

    r = run(base, finetuned, exclude=exclude, quiet=quiet)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    rows = sorted(r["tensors"], key=lambda x: -x["p99"])
    rows = rows if top == 0 else rows[:top]
    w = max([len(x["name"]) for x in rows] + [5])
    hdr = f"{'tensor':<{w}} {'mean':>10} {'std':>10} {'p50|δ|':>10} {'p99|δ|':>10} {'max|δ|':>10} {'rel L2':>9}"
    typer.echo(hdr)
    for x in rows + [{"name": "MODEL", **r["model"]}]:
        typer.echo(f"{x['name']:<{w}} {x['mean']:>10.3g} {x['std']:>10.3g} {x['p50']:>10.3g} {x['p99']:>10.3g} "
                   f"{x['max_abs']:>10.3g} {x['rel_l2']:>9.3g}")


@app.command("recommend-dpp")
def recommend_dpp(
    base: str = typer.Argument(..., help="The base model."),
    finetuned: str = typer.Argument(..., help="The fine-tuned model."),
    rate: float = typer.Option(0.9, "--rate", "-p", help="The drop rate you want."),
    calibration: bool = typer.Option(False, help="You have calibration (unlabelled in-domain) inputs."),
    validation: bool = typer.Option(False, help="You have a labelled validation metric."),
    unlabelled: bool = typer.Option(False, help="You have unlabelled inputs for the output-change proxy."),
    large_delta: float = typer.Option(0.005, help="p99 |δ| above which deltas count as large (our threshold)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Recommend a DPP method from the delta statistics and the data you have, and explain why."""
    from weightops.dpp.rules import check_rate
    from weightops.dpp.q_search import is_decoder
    from weightops.dpp.stats import delta_stats as stats, recommend_dpp as run

    check_rate(rate)
    try:
        dec = is_decoder(finetuned)
    except Exception:  # no config.json (bare safetensors): assume an encoder, say so below
        dec = False
    r = run(stats(base, finetuned), rate=rate, calibration=calibration, validation=validation, unlabelled=unlabelled,
            decoder=dec, large_delta=large_delta)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    typer.echo(f"recommended: {r['method']}" + (f" (q by {r['q_by']})" if r["q_by"] else ""))
    for line in r["reasons"]:
        typer.echo(f"  - {line}")
    typer.echo("  weightops prune --base BASE --finetuned FT --out OUT " + " ".join(r["command_flags"]))
