"""`weightops graft | compose | reset | mask ...`: skill localization, sparse deltas, partial resets."""
from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from weightops.cli import app

mask_app = typer.Typer(help="Masks and sparse deltas: info, overlap, union, intersect, apply.", no_args_is_help=True)
app.add_typer(mask_app, name="mask")

SCOPE_HELP = ("Regex of eligible tensor names (default: every float tensor inside a transformer block, "
              "norms and biases included; embeddings and heads excluded).")


def _cmd() -> list[str]:
    return ["weightops"] + sys.argv[1:]


def _warn(warnings) -> None:
    for w in warnings or []:
        typer.echo(f"warning: {w}", err=True)


def _floats(text: Optional[str], what: str) -> Optional[list[float]]:
    from weightops.cli.merge import _floats as parse

    return parse(text, what)


@app.command()
def graft(
    base: str = typer.Option(..., "--base", "-b", help="The pre-trained model θ0."),
    finetuned: str = typer.Option(..., "--finetuned", "-f", help="The fine-tuned model θft (checkpoint or LoRA adapter on --base)."),
    sparsity: Optional[float] = typer.Option(None, help="Fraction of the eligible parameters to graft (e.g. 1e-4)."),
    k: Optional[int] = typer.Option(None, help="Number of parameters to graft (instead of --sparsity)."),
    scope: Optional[str] = typer.Option(None, help=SCOPE_HELP),
    whole: Optional[str] = typer.Option(None, help="Regex of tensors taken whole from the fine-tuned model (e.g. '^classifier\\.'); not counted in --sparsity."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Write the grafted model θ0 + γ⊙δ here."),
    mask_out: Optional[str] = typer.Option(None, help="Write the mask γ here."),
    delta_out: Optional[str] = typer.Option(None, help="Write the selected deltas as a sparse delta here (for `weightops compose`)."),
    mask: Optional[str] = typer.Option(None, help="Graft with this existing mask instead of making one."),
    learn: bool = typer.Option(False, help="Learn the mask on task data (sigmoid relaxation initialised from the top-|δ| mask)."),
    task: Optional[str] = typer.Option(None, help="--learn: task data, 'zoo:<task>', 'seqcls:<file.csv|.jsonl>' or 'module:function'."),
    steps: int = typer.Option(100, help="--learn: gradient steps on the mask logits."),
    lr: float = typer.Option(1e7, help="--learn: step size on S (the paper's 1e7 on the raw gradient)."),
    batch_size: int = typer.Option(32, help="--learn: examples per forward pass (gradients are summed over the train set)."),
    limit: Optional[int] = typer.Option(None, help="--learn: use at most this many training examples."),
    eval_every: int = typer.Option(10, help="--learn: score the binarised mask every N steps and keep the best."),
    seed: int = typer.Option(0, help="--learn: seed of the S initialisation."),
    binarize: str = typer.Option("topk", help="--learn: topk (exactly the target size, ties by position) or round (the paper's round(γ))."),
    eval_spec: Optional[str] = typer.Option(None, "--eval", help="--learn: score candidate masks with this evaluator (weightops.evaluate spec) instead of train+dev accuracy."),
    dtype: Optional[str] = typer.Option(None, help="Output dtype: auto (the base's), float32, bfloat16, float16."),
    shard_size: str = typer.Option("5GB", help="Maximum shard size of the output."),
    block_size: Optional[int] = typer.Option(None, help="Elements per block (bounds memory, never changes results)."),
    force: bool = typer.Option(False, help="Replace existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary."),
):
    """Graft the largest fine-tuning changes onto the base (Panigrahi et al. 2023).

    Data-free: the global top-|θft − θ0| elements of the eligible tensors, with an exact threshold found
    in a streaming pass. Example: weightops graft --base B --finetuned FT --sparsity 1e-4 --out G --mask-out M
    """
    if learn:
        from weightops.sparse.learn import learn_mask

        if task is None:
            from weightops.errors import WeightopsError

            raise WeightopsError("--learn needs --task (zoo:<task>, seqcls:<file> or module:function)")
        res = learn_mask(base, finetuned, task, sparsity=sparsity, k=k, scope=scope, whole=whole, out=out,
                         mask_out=mask_out, steps=steps, lr=lr, batch_size=batch_size, limit=limit,
                         eval_every=eval_every, seed=seed, binarize=binarize, evaluator=eval_spec, force=force,
                         quiet=quiet, command=_cmd())
        if not quiet:
            typer.echo(f"learned mask: {res['nnz']} parameters, {res['changed_from_init']} changed from the top-|δ| start "
                       f"(best step {res['best_step']}, train {res['best_train']:.4f}, dev {res['best_dev']:.4f}); wrote " + ", ".join(
                           f"{k_} {v}" for k_, v in (("model", res.get("model")), ("mask", res.get("mask"))) if v))
        return
    from weightops.sparse.graft import graft as run

    res = run(base, finetuned, out=out, mask_out=mask_out, delta_out=delta_out, sparsity=sparsity, k=k, scope=scope,
              whole=whole, mask=mask, dtype=dtype, shard_size=shard_size, block_size=block_size, force=force,
              quiet=quiet, command=_cmd())
    _warn(res.get("warnings"))
    if not quiet:
        m = res.get("method") or {}
        what = ", ".join(f"{n} {res[n]}" for n in ("model", "mask", "delta") if res.get(n))
        typer.echo(f"graft: {res['nnz']} parameters selected"
                   + (f" (k={m['k']} of {m['n_eligible']} eligible, |δ| threshold {m['threshold']:.4g}, "
                      f"{m['ties_taken']} ties taken)" if m.get("k") is not None else "") + f"; wrote {what}")


@app.command()
def compose(
    base: str = typer.Argument(..., help="The model the deltas apply to (θ0)."),
    deltas: List[str] = typer.Argument(..., help="Sparse deltas (weightops graft --delta-out, prune --format delta)."),
    out: str = typer.Option(..., "--out", "-o", help="Output model directory."),
    scales: Optional[str] = typer.Option(None, help="Per-delta scales, comma-separated (default 1 each: plain LT-SFT addition)."),
    dtype: Optional[str] = typer.Option(None, help="Output dtype: auto (the base's), float32, bfloat16, float16."),
    shard_size: str = typer.Option("5GB", help="Maximum shard size of the output."),
    block_size: Optional[int] = typer.Option(None, help="Elements per block."),
    force: bool = typer.Option(False, help="Replace an existing output."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Compose sparse deltas by addition, θ = θ0 + Σ s_i·δ_i (LT-SFT), with a conflict report.

    Where supports overlap, the deltas are summed; compose_report.json (next to the weights) lists the
    overlaps and sign conflicts per pair, layer and tensor.
    """
    from weightops.sparse.compose import compose as run

    res, rep = run(base, deltas, out, scales=_floats(scales, "--scales"), dtype=dtype, shard_size=shard_size,
                   block_size=block_size, force=force, quiet=quiet, command=_cmd())
    _warn(res.warnings)
    if not quiet:
        for p in rep["pairs"]:
            typer.echo(f"{p['a']} + {p['b']}: {p['overlap']} overlapping positions, {p['sign_conflicts']} with opposite signs")
        typer.echo(f"compose: wrote {res.out} ({sum(d['nnz'] for d in rep['deltas'])} delta entries)")


@app.command()
def reset(
    base: str = typer.Option(..., "--base", "-b", help="The pre-trained model θ0."),
    finetuned: str = typer.Option(..., "--finetuned", "-f", help="The fine-tuned model."),
    out: str = typer.Option(..., "--out", "-o", help="Output model directory."),
    fraction: float = typer.Option(0.5, help="Share of the eligible parameters reset to the base (not used by --by hft)."),
    by: str = typer.Option("parameter", help="parameter | row | tensor (one Philox draw per unit) | hft (the paper's per-layer category rule)."),
    seed: int = typer.Option(0, help="Seed: the reset mask is a pure function of (seed, tensor name, index)."),
    scope: Optional[str] = typer.Option(None, help=SCOPE_HELP + " Tensors outside keep their fine-tuned values."),
    dtype: Optional[str] = typer.Option(None, help="Output dtype."),
    shard_size: str = typer.Option("5GB", help="Maximum shard size of the output."),
    block_size: Optional[int] = typer.Option(None, help="Elements per block (never changes results)."),
    force: bool = typer.Option(False, help="Replace an existing output."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Reset part of a fine-tune to the base, θ0 + M⊙δ (HFT's half-reset), deterministic from --seed."""
    from weightops.sparse.reset import reset as run

    res = run(base, finetuned, out, fraction=fraction, by=by, seed=seed, scope=scope, dtype=dtype,
              shard_size=shard_size, block_size=block_size, force=force, quiet=quiet, command=_cmd())
    _warn(res.warnings)
    if not quiet:
        st = res.manifest["reset"]["stats"]
        frac = st["reset"] / st["eligible"] if st["eligible"] else 0.0
        typer.echo(f"reset: {st['reset']} of {st['eligible']} eligible parameters ({frac:.4f}) back to the base; wrote {res.out}")


@mask_app.command("info")
def mask_info(path: str = typer.Argument(..., help="A mask or sparse delta directory."),
              as_json: bool = typer.Option(False, "--json", help="Print the whole manifest.")):
    """Kind, size, density and provenance of a mask or sparse delta (validated on the way)."""
    from weightops.sparse.format import open_sparse

    f = open_sparse(path)
    m = f.manifest
    if as_json:
        typer.echo(json.dumps(m, indent=1))
        return
    method = (m.get("method") or {}).get("name", "?")
    typer.echo(f"{f.path}: {f.kind}, {len(f.tensors)} tensors, nnz {f.nnz} of {f.numel} ({m['density']:.3g}), "
               f"{m['data']['bytes'] / 1e6:.2f} MB, made by {method}")
    for s in m.get("sources", []):
        typer.echo(f"  {s['role']}: {s['path']}")


@mask_app.command("overlap")
def mask_overlap(
    masks: List[str] = typer.Argument(..., help="Two or more masks (or sparse deltas: their supports)."),
    labels: Optional[str] = typer.Option(None, help="Comma-separated names for the table and plot (default: directory names)."),
    png: Optional[str] = typer.Option(None, help="Write a heatmap PNG (overall Jaccard and asymmetric overlap, per-layer Jaccard)."),
    out_json: Optional[str] = typer.Option(None, "--json", help="Write the full report as JSON."),
):
    """Overlap of masks per layer and overall: Jaccard |i∩j|/|i∪j| and asymmetric |i∩j|/|j|."""
    from weightops.errors import WeightopsError
    from weightops.sparse.masks import overlap, overlap_heatmap, overlap_table, write_atomic

    if len(masks) < 2:
        raise WeightopsError("mask overlap needs at least two masks")
    rep = overlap(masks, labels.split(",") if labels else None)
    typer.echo(overlap_table(rep))
    if png:
        overlap_heatmap(rep, png)
        typer.echo(f"wrote {png}")
    if out_json:
        write_atomic(out_json, lambda p: p.write_text(json.dumps(rep, indent=1) + "\n"))
        typer.echo(f"wrote {out_json}")


def _combine(op: str, masks: list[str], out: str, force: bool) -> None:
    from weightops.sparse.format import open_sparse
    from weightops.sparse.masks import combine_masks

    combine_masks(masks, out, op, force=force)
    f = open_sparse(out)
    typer.echo(f"{op}: wrote {out} (nnz {f.nnz}, density {f.manifest['density']:.3g})")


@mask_app.command("union")
def mask_union(masks: List[str] = typer.Argument(...), out: str = typer.Option(..., "--out", "-o"),
               force: bool = typer.Option(False)):
    """Union of masks (e.g. to graft several tasks at once)."""
    _combine("union", masks, out, force)


@mask_app.command("intersect")
def mask_intersect(masks: List[str] = typer.Argument(...), out: str = typer.Option(..., "--out", "-o"),
                   force: bool = typer.Option(False)):
    """Intersection of masks."""
    _combine("intersection", masks, out, force)


@mask_app.command("apply")
def mask_apply(
    mask: str = typer.Argument(..., help="A mask (γ), or a sparse delta (then --finetuned is not used)."),
    base: str = typer.Option(..., "--base", "-b"),
    finetuned: Optional[str] = typer.Option(None, "--finetuned", "-f", help="Needed for a mask: θ0 + γ⊙(θft − θ0)."),
    out: str = typer.Option(..., "--out", "-o"),
    dtype: Optional[str] = typer.Option(None),
    block_size: Optional[int] = typer.Option(None),
    force: bool = typer.Option(False),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Write θ0 + γ⊙δ for a mask (with --finetuned) or θ0 + δ for a sparse delta."""
    from weightops.errors import WeightopsError
    from weightops.sparse.apply import apply_mask, apply_sparse_delta
    from weightops.sparse.format import open_sparse

    f = open_sparse(mask)
    if f.kind == "delta" and finetuned is None:
        res = apply_sparse_delta(base, f, out, dtype=dtype, block_size=block_size, force=force, quiet=quiet, command=_cmd())
    elif finetuned is None:
        raise WeightopsError(f"{mask} is a mask: give --finetuned (the model whose deltas it selects)")
    else:
        res = apply_mask(base, finetuned, f, out, dtype=dtype, block_size=block_size, force=force, quiet=quiet, command=_cmd())
    _warn(res.warnings)
    if not quiet:
        typer.echo(f"wrote {res.out} ({f.kind} with {f.nnz} entries)")
