"""`weightops patch create | check | apply`: portable patches across model versions (PortLLM)."""
from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from weightops.cli import app

patch_app = typer.Typer(help="Portable patches (PortLLM): make a fine-tune's update on V1 portable, check it against V2, "
                             "add it to V2.", no_args_is_help=True)
app.add_typer(patch_app, name="patch")

RENAME_HELP = "Rename rule 'PATTERN=>REPLACEMENT' (Python regex, applied in order) mapping patch names to the target's; repeatable."


def _command() -> list[str]:
    return ["weightops"] + sys.argv[1:]


@patch_app.command("create")
def create(
    base: str = typer.Option(..., "--base", "-b", help="V1: the model the adapter or fine-tune was trained from."),
    out: str = typer.Option(..., "--out", "-o", help="Patch directory to write (atomically)."),
    adapter: Optional[str] = typer.Option(None, help="A PEFT LoRA adapter dir on V1: B, A and the scale are kept exactly."),
    finetuned: Optional[str] = typer.Option(None, help="A full fine-tune of V1: each changed matrix's δ is factored by truncated SVD."),
    rank: Optional[int] = typer.Option(None, help="--finetuned: keep the top R singular directions of each δ (capped at the matrix rank)."),
    energy: Optional[float] = typer.Option(None, help="--finetuned: per matrix, the smallest rank keeping this fraction of ‖δ‖² (e.g. 0.9)."),
    non_matrix: str = typer.Option("dense", help="--finetuned: changed tensors that are not matrices (biases, norms): dense | skip."),
    dense: Optional[str] = typer.Option(None, help="--finetuned: regex of matrices stored as dense deltas instead of factors."),
    skip: Optional[str] = typer.Option(None, help="Regex of tensors left out of the patch."),
    dtype: str = typer.Option("float32", help="--finetuned: dtype of the stored factors and deltas (float32, bfloat16, float16, float64)."),
    force: bool = typer.Option(False, help="Replace an existing patch directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Make a patch from a LoRA adapter or a full fine-tune of V1.

    Example: weightops patch create --base v1 --adapter lora --out p   |   --finetuned ft --energy 0.9
    """
    from weightops.patches import create_patch

    r = create_patch(base, out, adapter=adapter, finetuned=finetuned, rank=rank, energy=energy, non_matrix=non_matrix,
                     dense=dense, skip=skip, dtype=dtype, force=force, quiet=quiet, command=_command())
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    if quiet:
        return
    rows = r["entries"]
    width = max((len(e["name"]) for e in rows), default=6)
    typer.echo(f"{'target':<{width}}  {'kind':<8} {'shape':<14} {'rank':>5} {'scale':>8} {'energy':>8} {'rel err':>9}")
    for e in rows:
        num = lambda k, f: format(e[k], f) if e.get(k) is not None else "-"  # noqa: E731
        typer.echo(f"{e['name']:<{width}}  {e['kind']:<8} {str(e['shape']):<14} {num('rank', 'd'):>5} {num('scale', '.4g'):>8} "
                   f"{num('energy', '.4f'):>8} {num('rel_error', '.3g'):>9}")
    reasons: dict[str, int] = {}
    for s in r["skipped"]:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    skipped = ", ".join(f"{n} {k}" for k, n in reasons.items())
    typer.echo(f"{r['source']} patch: {len(rows)} targets, {r['bytes'] / 1e6:.2f} MB -> {r['out']}"
               + (f" (left out: {skipped})" if skipped else "") + f" in {r['seconds']:.1f} s")


@patch_app.command("check")
def check(
    patch: str = typer.Argument(..., help="A patch directory."),
    to: str = typer.Option(..., "--to", help="V2: the checkpoint to patch."),
    source: Optional[str] = typer.Option(None, "--from", help="V1 (the patch's base), for the drift report ‖θv2 − θv1‖ vs ‖ΔW‖."),
    rename: Optional[List[str]] = typer.Option(None, help=RENAME_HELP),
    allow_dtype_mix: bool = typer.Option(False, help="Accept targets whose dtype differs from V1's (added in fp32, cast to V2's)."),
    top: int = typer.Option(20, help="Drift rows to show, largest drift/patch first (0: all)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Can PATCH be added to V2? Names, shapes, dtypes; with --from V1, how far the base moved per matrix.

    Exits 2 with one error line when the patch does not fit.
    """
    from weightops.patches import check_patch

    rep = check_patch(patch, to, source=source, rename=rename, allow_dtype_mix=allow_dtype_mix, quiet=quiet)
    if as_json:
        typer.echo(json.dumps(rep.to_json(), indent=2))
    else:
        n = len(rep.mapping)
        renamed = sum(k != v for k, v in rep.mapping.items())
        typer.echo(f"{rep.patch} -> {rep.target}: {n - len({p['name'] for p in rep.problems})}/{n} targets fit"
                   + (f" ({renamed} renamed)" if renamed else ""))
        for note in rep.notes:
            typer.echo(f"note: {note}")
        if rep.drift:
            rows = sorted(rep.drift, key=lambda x: -x["drift_over_patch"])
            rows = rows if top == 0 else rows[:top]
            width = max(len(x["target"]) for x in rows)
            typer.echo(f"{'target':<{width}}  {'kind':<8} {'rank':>5} {'‖ΔW‖':>10} {'‖v2−v1‖':>10} {'ratio':>8} {'rel drift':>9}")
            for x in rows:
                rel = x["drift_norm"] / x["v1_norm"] if x["v1_norm"] > 0 else float("nan")
                typer.echo(f"{x['target']:<{width}}  {x['kind']:<8} {x['rank'] if x['rank'] is not None else '-':>5} "
                           f"{x['patch_norm']:>10.4g} {x['drift_norm']:>10.4g} {x['drift_over_patch']:>8.3g} {rel:>9.3g}")
            if len(rows) < len(rep.drift):
                typer.echo(f"... {len(rep.drift) - len(rows)} more (--top 0 lists all)")
    rep.raise_if_incompatible()


@patch_app.command("apply")
def apply(
    patch: str = typer.Argument(..., help="A patch directory."),
    to: str = typer.Option(..., "--to", help="V2: the checkpoint to patch."),
    out: str = typer.Option(..., "--out", "-o", help="Output directory (written atomically; must not exist unless --force)."),
    scale: float = typer.Option(1.0, help="Coefficient s of θv2 + s·ΔW (PortLLM: 1)."),
    rename: Optional[List[str]] = typer.Option(None, help=RENAME_HELP),
    as_adapter: bool = typer.Option(False, help="Write a PEFT LoRA adapter for V2 instead of a model (low-rank patches only)."),
    allow_dtype_mix: bool = typer.Option(False, help="Accept targets whose dtype differs from V1's (added in fp32, cast to V2's)."),
    dtype: Optional[str] = typer.Option(None, help="Output dtype: auto (V2's), float32, bfloat16, float16."),
    shard_size: str = typer.Option("5GB", help="Maximum shard size of the output."),
    block_size: Optional[int] = typer.Option(None, help="Elements per block (default 4194304); bounds memory, never changes results."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's)."),
    clamp: bool = typer.Option(False, help="Clamp values outside the output dtype's range instead of failing."),
    strict: bool = typer.Option(False, help="Fail on NaN/Inf in V2 instead of warning."),
    force: bool = typer.Option(False, help="Replace an existing output directory (only once the new one is complete)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
):
    """Add PATCH to V2 (θ = θv2 + s·ΔW), streaming; or write it as a PEFT adapter for V2 (--as-adapter).

    Example: weightops patch apply p --to v2 --out v2-patched
    """
    from weightops.patches import apply_patch

    res = apply_patch(patch, to, out, scale=scale, rename=rename, as_adapter=as_adapter, allow_dtype_mix=allow_dtype_mix,
                      dtype=dtype, shard_size=shard_size, block_size=block_size, threads=threads, clamp=clamp,
                      strict=strict, force=force, quiet=quiet, command=_command())
    for w in res.warnings:
        typer.echo(f"warning: {w}", err=True)
    if not quiet:
        what = "PEFT adapter" if as_adapter else "model"
        typer.echo(f"patch: wrote {what} {res.out} ({res.bytes_written / 1e6:.2f} MB, {res.manifest['patch']['targets']} "
                   f"targets, scale {scale:g}) in {res.seconds:.1f} s")
