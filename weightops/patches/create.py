"""Make a patch from a PEFT LoRA adapter (exact) or from a full fine-tune (truncated SVD of δ).

From an adapter, B, A and the scale are kept byte for byte, and
`modules_to_save` tensors (e.g. a classifier head) become `value` entries.
From a full fine-tune, each changed matrix's δ = θft − θv1 is factored by a
full SVD and truncated to `rank` (or to the smallest rank capturing `energy`
of ‖δ‖²): B = U_r·diag(σ_r), A = V_rᵀ, scale 1. Non-matrix tensors (biases,
norms) are stored dense or skipped (`non_matrix`); `dense` / `skip` regexes
override per tensor; tensors with δ == 0 are left out.

The patch is held in memory until it is written: it is low-rank by design,
while the inputs are streamed one tensor at a time.
"""
from __future__ import annotations

import datetime as _dt
import math
import re
import time
from pathlib import Path

import torch

from weightops import __version__
from weightops.errors import OutputError, WeightopsError, check_finite
from weightops.io.checkpoint import Checkpoint, is_adapter_dir
from weightops.patches.format import PatchEntry, dtype_name, fingerprint, write_patch

NON_MATRIX = ("dense", "skip")
FACTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _provenance(command, **options) -> dict:
    return {"weightops_version": __version__, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "options": {k: v for k, v in options.items() if v is not None}}


def choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """`rank` capped at the matrix's, or the smallest r with Σ_{i<r} σi² ≥ energy · Σ σi²."""
    if rank is not None:
        return min(rank, s.numel())
    sq = s.double().square()
    cum = torch.cumsum(sq, 0)
    total = float(cum[-1]) if cum.numel() else 0.0
    if total == 0.0:
        return 0
    # tolerance: energy=1.0 must select full rank despite rounding in the cumulative sum
    return min(int(torch.searchsorted(cum, energy * total * (1 - 1e-12)).item()) + 1, s.numel())


def svd_factors(delta: torch.Tensor, rank: int | None, energy: float | None):
    """(B, A, rank, captured energy, relative Frobenius error) of the truncated SVD of a matrix."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = max(choose_rank(s, rank, energy), 1)
    sq = s.double().square()
    total = float(sq.sum())
    kept = float(sq[:r].sum())
    # The error of the best rank-r approximation is exactly the tail of the spectrum (Eckart–Young).
    rel_error = math.sqrt(float(sq[r:].sum()) / total) if total > 0 else 0.0
    return u[:, :r] * s[:r], vh[:r].clone(), r, (kept / total if total > 0 else 1.0), rel_error


def create_patch(base, out, *, adapter=None, finetuned=None, rank: int | None = None, energy: float | None = None,
                 non_matrix: str = "dense", dense: str | None = None, skip: str | None = None,
                 dtype: str = "float32", force: bool = False, quiet: bool = False,
                 command: list[str] | None = None) -> dict:
    """Write a patch of `adapter` (LoRA on `base`) or of `finetuned` − `base` to `out`; returns a report."""
    check_finite(energy=energy)
    from weightops.engine import _progress

    t0 = time.perf_counter()
    if (adapter is None) == (finetuned is None):
        raise WeightopsError("give exactly one of --adapter (a PEFT LoRA dir) or --finetuned (a full fine-tune)")
    if adapter is not None and (rank is not None or energy is not None or dense or non_matrix != "dense"):
        raise WeightopsError("--rank, --energy, --dense and --non-matrix apply to --finetuned only (an adapter's patch is exact)")
    if finetuned is not None:
        if (rank is None) == (energy is None):
            raise WeightopsError("--finetuned needs exactly one of --rank R or --energy E (e.g. --energy 0.9)")
        if rank is not None and rank < 1:
            raise WeightopsError(f"--rank must be at least 1, got {rank}")
        if energy is not None and not 0 < energy <= 1:
            raise WeightopsError(f"--energy must be in (0, 1], got {energy}")
        if non_matrix not in NON_MATRIX:
            raise WeightopsError(f"--non-matrix must be one of {', '.join(NON_MATRIX)}, got {non_matrix}")
        if is_adapter_dir(finetuned):
            raise WeightopsError(f"{finetuned} is a LoRA adapter; pass it with --adapter")
    if dtype not in FACTOR_DTYPES:
        raise WeightopsError(f"--dtype must be one of {', '.join(FACTOR_DTYPES)}, got {dtype}")
    if Path(out).exists() and not force:
        raise OutputError(f"{out} exists; pass --force to replace it")
    try:
        skip_re = re.compile(skip) if skip else None
        dense_re = re.compile(dense) if dense else None
    except re.error as e:
        raise WeightopsError(f"bad regex in --skip/--dense: {e}") from None

    base_ck = Checkpoint(base)
    total = base_ck.nbytes * (1 if adapter is not None else 2)
    with _progress(total, quiet, "patch create") as bar:
        if adapter is not None:
            entries, tensors, skipped, source = _from_adapter(base_ck, adapter, skip_re)
        else:
            entries, tensors, skipped, source = _from_finetune(base_ck, finetuned, rank, energy, non_matrix,
                                                               dense_re, skip_re, FACTOR_DTYPES[dtype], bar.update)
        fp = fingerprint(base_ck, bar.update)
    if not entries:
        raise WeightopsError(f"nothing to patch: no tensor of {base} is changed by the {'adapter' if adapter else 'fine-tune'}")
    source["base"] = {"path": str(base), "files": base_ck.file_hashes()}
    prov = _provenance(command, rank=rank, energy=energy, non_matrix=non_matrix if finetuned else None,
                       dense=dense, skip=skip, dtype=dtype if finetuned else None)
    write_patch(out, entries, tensors, fingerprint=fp, source=source, provenance=prov, force=force)
    base_ck.close()
    return {
        "out": str(out),
        "source": source["kind"],
        "entries": [{"name": e.name, **e.to_json()} for e in entries],
        "skipped": skipped,
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "base_fingerprint": fp["sha256"],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _from_adapter(base_ck, adapter, skip_re):
    from weightops.io.adapter import LoraAdapter

    ad = LoraAdapter(adapter, base_ck)
    rslora = bool(ad.config.get("use_rslora"))
    entries, tensors, skipped = [], {}, []
    for name, info in base_ck.infos.items():  # base order: deterministic, and the order apply streams in
        if not ad.changes(name):
            continue
        if skip_re is not None and skip_re.search(name):
            skipped.append({"name": name, "reason": "--skip"})
            continue
        if name not in ad.factors:  # a replaced tensor, or a bias with its lora_B.bias added: the value itself
            e = PatchEntry(name, "value", tuple(info.shape), dtype_name(info.dtype))
            v = ad.replaced.get(name, info)
            tensors[e.keys[0]] = ad.read(name, 0, info.numel).to(v.dtype).reshape(info.shape)
        else:
            f = ad.factors[name]
            layout = "embedding" if "lora_embedding" in f.a.name else ("fan_in_fan_out" if f.transpose else "linear")
            e = PatchEntry(name, "lowrank", tuple(info.shape), dtype_name(info.dtype), rank=f.rank, alpha=f.alpha,
                           scale=f.scale, scaling="alpha/sqrt(r)" if rslora else "alpha/r", layout=layout)
            for key, t in zip(e.keys, (f.a, f.b)):
                tensors[key] = t.file.read(t, 0, t.numel).reshape(t.shape)
        entries.append(e)
    source = {"kind": "lora", "adapter": {"path": str(adapter), "files": ad.file_hashes()}, "peft_config": ad.config}
    return entries, tensors, skipped, source


def _from_finetune(base_ck, finetuned, rank, energy, non_matrix, dense_re, skip_re, out_dtype, progress):
    from weightops.engine import plan_tensors

    ft = Checkpoint(finetuned)
    # Shapes must agree; tensors only one side has cannot be patched and are listed as left out.
    plan, _ = plan_tensors(base_ck, [ft], out_dtype=None, allow_missing=True, allow_dtype_mix=True, exclude=None)
    entries, tensors = [], {}
    skipped = [{"name": n, "reason": "not in the base"} for n in ft.infos if n not in base_ck.infos]
    for p in plan:
        info = base_ck.infos[p.name]
        progress(info.nbytes)
        if p.action != "merge":
            skipped.append({"name": p.name, "reason": p.reason})
            continue
        if skip_re is not None and skip_re.search(p.name):
            skipped.append({"name": p.name, "reason": "--skip"})
            continue
        n = info.numel
        delta = (ft.read(p.name, 0, n).float() - base_ck.read(p.name, 0, n).float()).reshape(info.shape)
        base_ck.release(p.name, 0, n)
        ft.release(p.name, 0, n)
        if not bool(delta.any()):
            skipped.append({"name": p.name, "reason": "unchanged"})
            continue
        matrix = delta.ndim == 2 and not (dense_re is not None and dense_re.search(p.name))
        if not matrix and delta.ndim != 2 and non_matrix == "skip":
            skipped.append({"name": p.name, "reason": "non-matrix"})
            continue
        if matrix:
            b, a, r, captured, err = svd_factors(delta, rank, energy)
            e = PatchEntry(p.name, "lowrank", tuple(info.shape), dtype_name(info.dtype), rank=r, alpha=float(r),
                           scale=1.0, scaling="svd", energy=captured, rel_error=err)
            tensors[e.keys[0]], tensors[e.keys[1]] = a.to(out_dtype), b.to(out_dtype)
        else:
            e = PatchEntry(p.name, "dense", tuple(info.shape), dtype_name(info.dtype))
            tensors[e.keys[0]] = delta.to(out_dtype)
        entries.append(e)
    source = {"kind": "finetune", "finetuned": {"path": str(finetuned), "files": ft.file_hashes()}}
    ft.close()
    return entries, tensors, skipped, source
