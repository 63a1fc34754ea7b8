"""Write models from masks and sparse deltas, through `run_streaming`.

- apply_mask(base, finetuned, mask):        θ = θ0 + γ⊙δ, i.e. θft where γ = 1, θ0 elsewhere
  (a select, not θ0 + (θft − θ0), so a mask of all ones gives θft bit for bit)
- apply_sparse_delta(base, deltas, scales): θ = θ0 + Σ_i s_i·δ_i, in fp32, in the order given

Tensors outside every file's scope are copied from the base untouched.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from weightops.errors import AlignmentError, WeightopsError, check_finite
from weightops.methods.base import Method
from weightops.sparse.format import SparseFile, check_against, open_sparse, read_sparse_delta


class MaskGraft(Method):
    """θft where the mask selects, θ0 elsewhere (sources: [finetuned])."""

    name = "graft"
    summary = "θ0 + γ⊙(θft − θ0) for a binary mask γ"

    def __init__(self, mask: SparseFile):
        self.mask = mask

    def merge_block(self, job, p, state, start, base, models):
        out = base.to(torch.float32, copy=True)  # never write into the mapped input
        if job.name in self.mask.tensors:
            pos, _ = self.mask.block(job.name, start, start + base.numel())
            out[pos] = models[0][pos].float()
        return out


class SparseAdd(Method):
    """θ0 + Σ s_i·δ_i over sparse deltas (no model sources)."""

    name = "sparse_add"
    summary = "θ0 + Σ s_i·δ_i for sparse deltas δ_i"

    def __init__(self, deltas: list[SparseFile], scales: list[float]):
        self.deltas, self.scales = deltas, scales

    def merge_block(self, job, p, state, start, base, models):
        out = base.to(torch.float32, copy=True)  # never write into the mapped input
        for d, s in zip(self.deltas, self.scales):
            if job.name in d.tensors:
                pos, val = d.block(job.name, start, start + base.numel())
                out[pos] += s * val.float()
        return out


def scope_exclude(names_in_scope, base_names, user_exclude: str | None = None) -> str | None:
    """A regex for run_streaming's `exclude` that copies every tensor outside the scope from the base."""
    outside = [n for n in base_names if n not in names_in_scope]
    parts = [f"^(?:{'|'.join(re.escape(n) for n in outside)})$"] if outside else []
    if user_exclude:
        parts.append(f"(?:{user_exclude})")
    return "|".join(parts) or None


def _check_float(sparse: SparseFile, base) -> None:
    bad = [n for n in sparse.tensors if not base.infos[n].is_float]
    if bad:
        raise AlignmentError(f"{sparse.path}: tensor '{bad[0]}' is not floating point in {base.path}")


def _fingerprint_warnings(sparse: SparseFile, manifest: dict) -> list[str]:
    """Compare the base's file hashes with the ones the sparse file was made from (after the run, at no cost)."""
    made = {f["sha256"] for s in sparse.manifest.get("sources", []) if s.get("role") == "base" for f in s.get("files", [])}
    used = {f["sha256"] for i in manifest.get("inputs", []) if i.get("role") == "base" for f in i.get("files", [])}
    if made and used and not (made & used):
        return [f"{sparse.path} was made from a different base checkpoint (sha256 differs); shapes match, so it was applied"]
    return []


def apply_mask(base, finetuned, mask, out, *, dtype=None, shard_size="5GB", block_size=None, force=False,
               quiet=False, command=None, manifest_extra=None):
    """Graft: θ0 + γ⊙(θft − θ0) for the mask at `mask` (a path or SparseFile); returns the MergeResult."""
    from weightops.engine import run_streaming
    from weightops.io.checkpoint import Checkpoint, open_source

    m = mask if isinstance(mask, SparseFile) else open_sparse(mask)
    base_src = Checkpoint(base)
    ft = open_source(finetuned, base_src)
    check_against(m, base_src.infos, str(base_src.path))
    _check_float(m, base_src)
    extra = {"mask": {"path": str(m.path), "sha256": m.sha256(), "nnz": m.nnz, "kind": m.kind},
             **(manifest_extra or {})}
    res = run_streaming(MaskGraft(m), None, base_src, [ft], out=out, dtype=dtype, shard_size=shard_size,
                        block_size=block_size, exclude=scope_exclude(m.tensors, base_src.infos), force=force,
                        quiet=quiet, command=command, manifest_extra=extra)
    res.warnings.extend(_fingerprint_warnings(m, res.manifest))
    return res


def apply_sparse_delta(base, deltas, out, *, scales=None, dtype=None, shard_size="5GB", block_size=None,
                       force=False, quiet=False, command=None, manifest_extra=None, extra_json=None):
    """θ0 + Σ s_i·δ_i for sparse deltas (paths or SparseFiles; one or several); returns the MergeResult."""
    check_finite(scales=scales)
    from weightops.engine import run_streaming
    from weightops.io.checkpoint import Checkpoint

    if isinstance(deltas, (str, Path, SparseFile)):
        deltas = [deltas]
    ds = [d if isinstance(d, SparseFile) else read_sparse_delta(d) for d in deltas]
    if not ds:
        raise WeightopsError("no sparse delta given")
    for d in ds:
        if d.kind != "delta":
            raise WeightopsError(f"{d.path} is a mask, not a sparse delta (apply masks with a fine-tuned model: `weightops mask apply`)")
    scales = [1.0] * len(ds) if scales is None else [float(s) for s in scales]
    if len(scales) != len(ds):
        raise WeightopsError(f"{len(ds)} deltas but {len(scales)} scales")
    base_src = Checkpoint(base)
    for d in ds:
        check_against(d, base_src.infos, str(base_src.path))
        _check_float(d, base_src)
    scope = set().union(*(d.tensors for d in ds))
    extra = {"deltas": [{"path": str(d.path), "sha256": d.sha256(), "nnz": d.nnz, "scale": s} for d, s in zip(ds, scales)],
             **(manifest_extra or {})}
    res = run_streaming(SparseAdd(ds, scales), None, base_src, [], out=out, dtype=dtype, shard_size=shard_size,
                        block_size=block_size, exclude=scope_exclude(scope, base_src.infos), force=force, quiet=quiet,
                        command=command, manifest_extra=extra, extra_json=extra_json)
    for d in ds:
        res.warnings.extend(_fingerprint_warnings(d, res.manifest))
    return res
