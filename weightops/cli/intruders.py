"""`weightops intruders`: intruder-dimension report of fine-tunes/LoRA adapters, and mitigation."""
from __future__ import annotations

import sys
from typing import List, Optional

import typer

from weightops.cli import app


@app.command()
def intruders(
    base: str = typer.Argument(..., help="The pre-trained checkpoint W0 (HF dir or .safetensors)."),
    targets: List[str] = typer.Argument(..., help="Fine-tuned checkpoints and/or PEFT LoRA adapter dirs (several: one report comparing them)."),
    compare: Optional[List[str]] = typer.Option(None, "--compare", help="More targets for the same report (repeatable; same as extra positional targets)."),
    top_k: int = typer.Option(10, "--top-k", "-k", help="Top singular vectors of W examined per matrix (the paper: 10)."),
    eps: float = typer.Option(0.5, help="ε: intruder iff max |cos| with every base left singular vector < ε."),
    eps_grid: Optional[str] = typer.Option(None, help="ε values for the counts-vs-ε curve, comma-separated (default 0.05,0.1,...,0.95)."),
    modules: Optional[str] = typer.Option(None, help="Regex of tensor names to analyse (default: attention and MLP linear weights of numbered layers)."),
    labels: Optional[str] = typer.Option(None, help="Names of the targets in the report, comma-separated."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Write report.json, index.html and PNG plots to this directory."),
    plot_matrix: Optional[str] = typer.Option(None, help="Matrix (name or regex) for the spectrum and cosine plots (default: most intruders)."),
    exact: bool = typer.Option(False, "--exact", help="Full SVD of every W (the reference; same as --solver exact)."),
    solver: str = typer.Option("auto", help="auto (full SVD for min(m,n) ≤ 64, else fast) | fast | exact."),
    cache_dir: Optional[str] = typer.Option(None, help="Base-SVD cache (default $WEIGHTOPS_CACHE/svd or ~/.cache/weightops/svd)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the base-SVD cache."),
    workers: int = typer.Option(1, help="Matrices analysed in parallel (each holds one matrix in memory)."),
    seed: int = typer.Option(0, help="Seed of the random start blocks (results do not depend on it beyond rounding)."),
    write_model: Optional[str] = typer.Option(None, help="Write the merged model with each intruder's σ scaled by --scale (one target)."),
    write_adapter: Optional[str] = typer.Option(None, help="LoRA target: write a rank-r adapter of the mitigated ΔW (peft's write-back; lossy)."),
    scale: float = typer.Option(0.75, "--scale", help="λ for --write-model/--write-adapter: intruder σ ← λ·σ (peft's default 0.75)."),
    dtype: Optional[str] = typer.Option(None, help="--write-model output dtype: auto (the base's), float32, bfloat16, float16."),
    shard_size: str = typer.Option("5GB", help="--write-model maximum shard size."),
    force: bool = typer.Option(False, help="Replace existing output directories."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary."),
):
    """Intruder dimensions of fine-tunes vs their base (Shuttleworth et al., "LoRA vs Full Fine-tuning").

    Examples:
      weightops intruders base lora-r8 --out report/
      weightops intruders base lora-r1 lora-r8 full-ft --labels r1,r8,full --out cmp/
      weightops intruders base lora-r8 --write-model mitigated --scale 0.75
    """
    import json

    from weightops.cli.merge import _floats
    from weightops.errors import WeightopsError
    from weightops.spectral import intruders as I
    from weightops.spectral import mitigate, report as R

    targets = list(targets) + list(compare or [])
    if exact:
        solver = "exact"
    if (write_model or write_adapter) and len(targets) != 1:
        raise WeightopsError("--write-model/--write-adapter take exactly one target")
    from pathlib import Path

    from weightops.errors import OutputError

    for path in (out, write_model, write_adapter):  # fail before the analysis, not after it
        if path and Path(path).exists() and not force:
            raise OutputError(f"{path} exists; pass --force to replace it")
    grid = tuple(_floats(eps_grid, "--eps-grid")) if eps_grid else I.DEFAULT_EPS_GRID
    opts = I.Options(top_k=top_k, eps=eps, eps_grid=grid, modules=modules, solver=solver,
                     cache_dir=None if no_cache else (cache_dir or "default"), workers=workers, seed=seed)
    command = ["weightops"] + sys.argv[1:]
    label_list = [x.strip() for x in labels.split(",")] if labels else None
    if write_model:
        rep, res = mitigate.write_model(base, targets[0], write_model, lam=scale, opts=opts, dtype=dtype,
                                        shard_size=shard_size, force=force, quiet=quiet, command=command)
    elif write_adapter:
        rep, losses = mitigate.write_adapter(base, targets[0], write_adapter, lam=scale, opts=opts, force=force,
                                             quiet=quiet, command=command)
    else:
        rep = I.analyse(base, targets, labels=label_list, opts=opts, detail=plot_matrix, quiet=quiet, command=command)
    if out:
        R.write_report(rep, out, force=force)
    if as_json:
        typer.echo(json.dumps(rep, indent=1))
        return
    if quiet:
        return
    for t in rep["targets"]:
        curve = ", ".join(f"{e}:{c}" for e, c in t["counts_vs_eps"].items() if float(e) in (0.1, 0.3, 0.5, 0.7, 0.9))
        typer.echo(f"{t['label']}: {t['total']} intruders at ε={eps:g} (top-{top_k}) in {t['matrices_with_intruders']}/"
                   f"{t['n_matrices']} matrices; vs ε {curve}; solvers {t['solvers']}; {t['seconds']:.1f} s")
        worst = sorted(t["matrices"], key=lambda m: -m["count"])[:5]
        for m in worst:
            if m["count"]:
                typer.echo(f"  {m['name']}: {m['count']} at ranks {[i['rank'] for i in m['intruders']]}, "
                           f"best |cos| {[round(i['best_cos'], 3) for i in m['intruders']]}")
    c = rep["cache"]
    typer.echo(f"base-SVD cache {c['dir']}: {c['hits']} hits, {c['misses']} computed")
    if write_model:
        typer.echo(f"wrote {res.out}: {res.manifest['intruders']['total']} intruder σ scaled by {scale:g}")
    if write_adapter:
        worst = max(losses.values(), default=0.0)
        typer.echo(f"wrote {write_adapter}: {len(losses)} matrices rewritten at rank r; "
                   f"max relative rank-r truncation loss {worst:.3g}")
    if out:
        typer.echo(f"report: {out}/index.html")
