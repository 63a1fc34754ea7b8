"""`weightops soup` and `weightops interpolate`."""
from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from weightops.cli import app

EVAL_HELP = ("Evaluator, higher is better: module:function, file.py:function, 'cmd:<shell command with {model}>' "
             "(last printed line = score), zoo:<task>[:<split>], seqcls:<file.csv|.jsonl>, lm:<text file> "
             "(negative perplexity). Options after '?', e.g. seqcls:val.csv?max_length=64&limit=500.")


def _echo_err(s: str) -> None:
    typer.echo(s, err=True)


@app.command()
def soup(
    models: List[str] = typer.Argument(..., help="Fine-tuned checkpoints of the same base (HF dirs or .safetensors)."),
    out: str = typer.Option(..., "--out", "-o", help="Output directory (written atomically; must not exist unless --force)."),
    method: str = typer.Option("uniform", "--method", "-m", help="uniform (mean of all), greedy (paper's Recipe 1), learned (mixing weights trained on held-out data)."),
    eval_spec: Optional[str] = typer.Option(None, "--eval", "-e", help=EVAL_HELP + " Use HELD-OUT data (e.g. zoo:<task>:validation), not the test set."),
    accept: str = typer.Option("ge", help="greedy: add an ingredient if the soup scores >= (ge, the paper) or > (gt, the paper's code) the best so far."),
    workers: int = typer.Option(1, help="Processes scoring the individual ingredients in parallel (needs a spec string)."),
    learn_on: Optional[str] = typer.Option(None, help="learned: labelled held-out data (zoo:<task>[:<split>] or seqcls:<file>); default --eval."),
    per_layer: bool = typer.Option(False, "--per-layer", help="learned: one weight per model and layer group."),
    group_by: str = typer.Option("layer", help="learned --per-layer: layer | tensor | a regex whose first group names the group."),
    steps: int = typer.Option(60, help="learned: optimiser steps."),
    lr: float = typer.Option(0.1, help="learned: Adam learning rate on the mixing logits."),
    batch_size: int = typer.Option(32, help="learned: examples per step."),
    seed: int = typer.Option(0, help="learned: seed of the batch order."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the score cache (~/.cache/weightops/eval)."),
    dtype: Optional[str] = typer.Option(None, help="Output dtype: auto (the models'), float32, bfloat16, float16."),
    shard_size: str = typer.Option("5GB", help="Maximum shard size of the output."),
    block_size: Optional[int] = typer.Option(None, help="Elements per block (bounds memory, never changes results)."),
    force: bool = typer.Option(False, help="Replace an existing output directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-candidate lines."),
    as_json: bool = typer.Option(False, "--json", help="Print the result (weights, every score) as JSON."),
):
    """Average fine-tuned models: uniform, greedy (held-out score decides each ingredient) or learned soup.

    Example: weightops soup ft_* --method greedy --eval zoo:sentiment:validation --out soup
    """
    from weightops.soup import soup as run

    res = run(models, out=out, method=method, evaluator=eval_spec, accept=accept, workers=workers, learn_on=learn_on,
              per_layer=per_layer, group_by=group_by, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
              cache=not no_cache, quiet=quiet, echo=None if quiet or as_json else typer.echo,
              command=["weightops"] + sys.argv[1:], dtype=dtype, shard_size=shard_size, block_size=block_size,
              force=force)
    if as_json:
        typer.echo(json.dumps(res.as_dict(), indent=2))
    elif not quiet:
        w = res.weights if isinstance(res.weights, list) else f"per group ({len(res.weights)} groups)"
        typer.echo(f"{res.method} soup: wrote {res.out} from {len(res.ingredients)} of {len(models)} model(s), "
                   f"weights {w}" + (f", score {res.score:.6g}" if res.score is not None else "")
                   + f"; log in {res.out}/soup.json ({res.seconds:.1f} s)")


@app.command()
def interpolate(
    base: str = typer.Argument(..., help="θ0: the zero-shot / pre-trained model."),
    ft: str = typer.Argument(..., help="θft: the fine-tuned model (or a LoRA adapter on BASE)."),
    out: str = typer.Option(..., "--out", "-o", help="Report directory (with --eval) or model directory (with --alpha)."),
    alphas: str = typer.Option("0:1:0.1", help="α grid for sweeps: start:stop:step (stop included) or a,b,c."),
    alpha: Optional[float] = typer.Option(None, help="Write the single model θ(α) = (1−α)θ0 + αθft to --out instead of sweeping."),
    eval_spec: Optional[List[str]] = typer.Option(None, "--eval", "-e", help="[NAME=]SPEC, repeatable (e.g. id=zoo:sentiment:test ood=zoo:sentiment:test_shifted). " + EVAL_HELP),
    per_layer: bool = typer.Option(False, "--per-layer", help="Also sweep α for one layer group at a time, the others at --rest-alpha."),
    groups: Optional[str] = typer.Option(None, help="--per-layer: only these groups (comma-separated; see interpolation.json for names)."),
    group_by: str = typer.Option("layer", help="Layer groups: layer (transformer blocks, embeddings, head...), tensor, or a regex whose first group names the group."),
    rest_alpha: float = typer.Option(1.0, help="--per-layer: α of every group not being swept (1 = fine-tuned)."),
    sparsify_layers: Optional[str] = typer.Option(None, help="Regex of tensor names whose delta is sparsified (top --density of |δ| kept) before interpolating."),
    density: float = typer.Option(1.0, help="Fraction of |δ| kept in --sparsify-layers tensors."),
    no_dense: bool = typer.Option(False, "--no-dense", help="With --sparsify-layers: skip the dense comparison curve."),
    workers: int = typer.Option(1, help="Candidates written and scored in parallel (needs spec strings)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the score cache."),
    no_plot: bool = typer.Option(False, "--no-plot", help="JSON only, no PNGs."),
    dtype: Optional[str] = typer.Option(None, help="Dtype of written models: auto (the base's), float32, bfloat16, float16."),
    block_size: Optional[int] = typer.Option(None, help="Elements per block (bounds memory, never changes results)."),
    force: bool = typer.Option(False, help="Replace an existing --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
):
    """WiSE-FT: θ(α) = (1−α)·θ0 + α·θft, swept over α and scored (curve.png + interpolation.json), per layer group too.

    Examples:
      weightops interpolate base ft --alphas 0:1:0.1 --eval id=zoo:sentiment:test --eval ood=zoo:sentiment:test_shifted --out wise
      weightops interpolate base ft --per-layer --alphas 0:1:0.25 --eval zoo:sentiment:validation --out layers
      weightops interpolate base ft --alpha 0.5 --out wise_0.5
    """
    from weightops.errors import WeightopsError
    from weightops.interpolate import interpolate as write_one
    from weightops.interpolate import sweep

    engine_kw = {"dtype": dtype, "block_size": block_size}
    if alpha is not None:
        if eval_spec or per_layer:
            raise WeightopsError("--alpha writes one model; drop --eval/--per-layer (or drop --alpha to sweep)")
        r = write_one(base, ft, out=out, alpha=alpha, sparsify=sparsify_layers, density=density, force=force,
                      quiet=quiet, command=["weightops"] + sys.argv[1:], **engine_kw)
        if not quiet:
            typer.echo(f"interpolate: wrote θ({alpha:g}) to {r.out} in {r.seconds:.1f} s")
        return
    if not eval_spec:
        raise WeightopsError("give --eval to sweep α, or --alpha A to write one interpolated model")
    res = sweep(base, ft, alphas=alphas, evals=list(eval_spec), out=out, per_layer=per_layer,
                groups=[g for g in groups.split(",") if g] if groups else None, group_by=group_by,
                rest_alpha=rest_alpha, sparsify=sparsify_layers, density=density, compare_dense=not no_dense,
                workers=workers, plot=not no_plot, force=force, quiet=quiet, cache=not no_cache, **engine_kw)
    if quiet:
        return
    names = list(res["curve"])
    typer.echo("alpha  " + "  ".join(f"{n:>12}" for n in names)
               + ("  " + "  ".join(f"{n + ' dense':>14}" for n in names) if "curve_dense" in res else ""))
    for i, a in enumerate(res["alphas"]):
        row = f"{a:5.2f}  " + "  ".join(f"{res['curve'][n][i]:12.6g}" for n in names)
        if "curve_dense" in res:
            row += "  " + "  ".join(f"{res['curve_dense'][n][i]:14.6g}" for n in names)
        typer.echo(row)
    for n, rows in res.get("stragglers", {}).items():
        top = ", ".join(f"{r['group']} (range {r['range']:.4g}, best α {r['best_alpha']:g})" for r in rows[:3])
        typer.echo(f"{n}: groups whose α moves the score most: {top}")
    typer.echo(f"wrote {res['out']}/interpolation.json and plots")
