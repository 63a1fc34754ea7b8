"""Data-free grafting (Panigrahi et al. 2023): the top-|δ| mask over the eligible tensors.

k = round(sparsity · N_elig) elements (at least 1 when sparsity > 0) with the
largest |θft − θ0| over ALL eligible tensors together (one global threshold),
found exactly in two streaming passes by `weightops.ops.kth_largest_abs`; a
third pass writes the mask (or the sparse delta).

Ties at the threshold t (k-th largest |δ|) are broken by position: every
element with |δ| > t is selected, then elements with |δ| == t in checkpoint
order (the base's tensor order, lowest flat index first) until exactly k are
selected. The paper's code takes |δ| > t (strict), i.e. up to k − 1 elements.

Eligible tensors (`scope`, a regex searched in tensor names): by default every
float tensor inside a transformer block (`…layer.N.` / `layers.N.` / `h.N.` /
`blocks.N.`), norms and biases included, embeddings and heads excluded, as in
the paper's code. `whole` (a regex) names tensors taken whole from the
fine-tuned model (e.g. a task head), stored as dense mask entries and not
counted in k.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from weightops.errors import NumericError, WeightopsError, check_finite
from weightops.sparse.format import SparseWriter

DEFAULT_SCOPE = r"(^|\.)(layer|layers|h|block|blocks)\.\d+\."
TIE_RULE = "all |d| > t, then |d| == t in checkpoint order (tensor order of the base, lowest flat index first) up to k"


@dataclass
class Selection:
    eligible: list[str]
    whole: list[str]
    n_eligible: int
    k: int
    threshold: float
    n_above: int  # elements with |δ| > threshold; k - n_above ties are taken


def _open_pair(base, finetuned):
    from weightops.engine import plan_tensors
    from weightops.io.checkpoint import Checkpoint, open_source

    base_src = base if hasattr(base, "infos") else Checkpoint(base)
    ft_src = finetuned if hasattr(finetuned, "infos") else open_source(finetuned, base_src)
    # same alignment rules (and messages) as merge
    plan_tensors(base_src, [ft_src], out_dtype=None, allow_missing=False, allow_dtype_mix=True, exclude=None)
    return base_src, ft_src


def sources_manifest(base_src, others: list[tuple[str, object]]) -> list[dict]:
    """Fingerprints of the inputs a mask or delta was made from (role, path, kind, file sha256s)."""
    out = [{"role": "base", "path": str(base_src.path), "kind": base_src.kind, "files": base_src.file_hashes()}]
    out += [{"role": role, "path": str(s.path), "kind": s.kind, "files": s.file_hashes()} for role, s in others]
    return out


def eligible_names(infos: dict, scope: str | None, whole: str | None) -> tuple[list[str], list[str]]:
    try:
        sc = re.compile(scope if scope is not None else DEFAULT_SCOPE)
        wh = re.compile(whole) if whole else None
    except re.error as e:
        raise WeightopsError(f"bad regex for --scope/--whole: {e}") from None
    floats = [n for n, i in infos.items() if i.is_float]
    wholes = [n for n in floats if wh is not None and wh.search(n)]
    elig = [n for n in floats if sc.search(n) and n not in wholes]
    return elig, wholes


def _blocks(base_src, ft_src, names, block_size):
    """(name, start, ft block, base block) over the named tensors, releasing pages as it goes."""
    for name in names:
        n = base_src.infos[name].numel
        for start in range(0, n, block_size):
            stop = min(n, start + block_size)
            yield name, start, ft_src.read(name, start, stop), base_src.read(name, start, stop)
            base_src.release(name, start, stop)
            ft_src.release(name, start, stop)


def select_top_delta(base_src, ft_src, *, sparsity: float | None = None, k: int | None = None,
                     scope: str | None = None, whole: str | None = None, block_size: int = 1 << 22,
                     quiet: bool = True) -> Selection:
    """The global top-k |δ| threshold over the eligible tensors (two streaming passes)."""
    check_finite(sparsity=sparsity)
    from weightops import ops
    from weightops.engine import _progress
    from weightops.methods.task_arithmetic import keep_count

    elig, wholes = eligible_names(base_src.infos, scope, whole)
    n_elig = sum(base_src.infos[n].numel for n in elig)
    if not elig or n_elig == 0:
        raise WeightopsError(f"no tensor matches --scope {scope or DEFAULT_SCOPE!r}; nothing to graft")
    if (sparsity is None) == (k is None):
        raise WeightopsError("give exactly one of --sparsity and --k")
    if sparsity is not None:
        if not 0 <= sparsity <= 1:
            raise WeightopsError(f"--sparsity must be in [0, 1] (a fraction of the eligible parameters), got {sparsity}")
        k = keep_count(sparsity, n_elig)
    if not 0 <= k <= n_elig:
        raise WeightopsError(f"--k must be in [0, {n_elig}] (the eligible parameters), got {k}")
    if k == 0:
        return Selection(elig, wholes, n_elig, 0, float("inf"), 0)
    nbytes = sum(base_src.infos[n].nbytes + ft_src.infos[n].nbytes for n in elig)
    bar = _progress(2 * nbytes, quiet, "graft: threshold")

    def stream():
        # small tensors (biases, norms) are batched into blocks of ~block_size deltas: each
        # histogram call has a fixed cost, and only the multiset of |δ| matters here
        pending, n_pending = [], 0
        for name, _, x, b in _blocks(base_src, ft_src, elig, block_size):
            d = x.float() - b.float()
            if not bool(torch.isfinite(d).all()):
                raise NumericError(f"NaN/Inf in the delta of tensor '{name}'; cannot rank deltas")
            bar.update(x.numel() * x.element_size() + b.numel() * b.element_size())
            if d.numel() >= block_size and not pending:
                yield d, None
                continue
            pending.append(d)
            n_pending += d.numel()
            if n_pending >= block_size:
                yield torch.cat(pending), None
                pending, n_pending = [], 0
        if pending:
            yield torch.cat(pending), None
    with bar:
        ((t, above),) = ops.kth_largest_abs(stream, [k], with_counts=True)
    return Selection(elig, wholes, n_elig, k, t, above)


def write_selection(path, base_src, ft_src, sel: Selection, *, kind: str = "mask", manifest: dict | None = None,
                    block_size: int = 1 << 22, force: bool = False, quiet: bool = True) -> Path:
    """Third pass: write the selected elements as a mask, or (kind="delta") as a sparse delta of fp32 δ values."""
    from weightops.engine import _progress

    ties_left = sel.k - sel.n_above
    nbytes = sum(base_src.infos[n].nbytes + ft_src.infos[n].nbytes for n in sel.eligible)
    with SparseWriter(path, kind, manifest, force=force) as w, _progress(nbytes, quiet, f"graft: {kind}") as bar:
        for name in sel.whole:
            info = base_src.infos[name]
            if kind == "mask":
                w.write_tensor(name, info.shape, info.dtype, None)
                continue
            w.begin(name, info.shape, info.dtype, dense=True, value_dtype=torch.float32)
            for _, _, x, b in _blocks(base_src, ft_src, [name], block_size):
                w.add(None, x.float() - b.float())
            w.end()
        current = None
        for name, start, x, b in _blocks(base_src, ft_src, sel.eligible, block_size):
            if name != current:
                if current is not None:
                    w.end()
                info = base_src.infos[name]
                w.begin(name, info.shape, info.dtype, value_dtype=torch.float32 if kind == "delta" else None)
                current = name
            d = x.float() - b.float()
            a = d.abs()
            keep = a > sel.threshold
            if ties_left > 0:
                tie = (a == sel.threshold).nonzero().flatten()[:ties_left]
                keep[tie] = True
                ties_left -= tie.numel()
            pos = keep.nonzero().flatten()
            w.add(pos + start, d[pos] if kind == "delta" else None)
            bar.update(x.numel() * x.element_size() + b.numel() * b.element_size())
        if current is not None:
            w.end()
        for name in sel.eligible:  # zero-size eligible tensors yield no blocks; still list them
            if name not in w.tensors:
                info = base_src.infos[name]
                w.write_tensor(name, info.shape, info.dtype, torch.zeros(0, dtype=torch.int64),
                               torch.zeros(0) if kind == "delta" else None)
        if ties_left:
            raise RuntimeError(f"graft: {ties_left} tied elements not found on the selection pass (inputs changed?)")
        return w.commit()


def graft_method_manifest(sel: Selection, sparsity, scope, whole) -> dict:
    return {"name": "graft-top-delta", "paper": "https://arxiv.org/abs/2302.06600", "sparsity": sparsity,
            "k": sel.k, "n_eligible": sel.n_eligible, "threshold": sel.threshold, "n_above_threshold": sel.n_above,
            "ties_taken": sel.k - sel.n_above, "tie_rule": TIE_RULE, "scope": scope or DEFAULT_SCOPE, "whole": whole,
            "eligible_tensors": len(sel.eligible), "whole_tensors": sel.whole}


def make_graft_mask(base, finetuned, out, *, sparsity: float | None = None, k: int | None = None,
                    scope: str | None = None, whole: str | None = None, kind: str = "mask", delta_out=None,
                    block_size: int | None = None, force: bool = False, quiet: bool = True) -> Path:
    """Write the data-free top-|δ| graft mask (or sparse delta, kind="delta") of `finetuned` over `base`;
    with `delta_out`, also the sparse delta of the same selection (one threshold search for both)."""
    block_size = int(block_size or (1 << 22))
    base_src, ft_src = _open_pair(base, finetuned)
    sel = select_top_delta(base_src, ft_src, sparsity=sparsity, k=k, scope=scope, whole=whole,
                           block_size=block_size, quiet=quiet)
    manifest = {"method": graft_method_manifest(sel, sparsity, scope, whole),
                "sources": sources_manifest(base_src, [("finetuned", ft_src)])}
    if delta_out is not None:
        write_selection(delta_out, base_src, ft_src, sel, kind="delta", manifest=manifest, block_size=block_size,
                        force=force, quiet=quiet)
    return write_selection(out, base_src, ft_src, sel, kind=kind, manifest=manifest, block_size=block_size,
                           force=force, quiet=quiet)


def graft(base, finetuned, *, out=None, mask_out=None, delta_out=None, sparsity: float | None = None,
          k: int | None = None, scope: str | None = None, whole: str | None = None, mask=None,
          dtype=None, shard_size="5GB", block_size: int | None = None, force: bool = False, quiet: bool = True,
          command=None) -> dict:
    """`weightops graft`: make the top-|δ| mask (unless `mask` is given) and write any of
    the grafted model (`out`), the mask (`mask_out`) and the sparse delta (`delta_out`)."""
    import shutil
    import tempfile

    from weightops.sparse.apply import apply_mask
    from weightops.sparse.format import open_sparse

    if out is None and mask_out is None and delta_out is None:
        raise WeightopsError("nothing to write: give --out (grafted model), --mask-out and/or --delta-out")
    for p in (out, mask_out, delta_out):
        if p is not None and Path(p).exists() and not force:
            raise WeightopsError(f"{p} exists; pass --force to replace it")
    result: dict = {}
    tmp = None
    try:
        if mask is None:
            if mask_out is None and out is not None:
                tmp = Path(tempfile.mkdtemp(prefix=".graft-mask-", dir=Path(out).resolve().parent))
            mpath = Path(mask_out) if mask_out is not None else (tmp / "mask" if tmp else None)
            if mpath is not None:
                make_graft_mask(base, finetuned, mpath, sparsity=sparsity, k=k, scope=scope, whole=whole,
                                delta_out=delta_out, block_size=block_size, force=force, quiet=quiet)
                result["mask"] = str(mpath) if mask_out is not None else None
            else:
                make_graft_mask(base, finetuned, delta_out, sparsity=sparsity, k=k, scope=scope, whole=whole,
                                kind="delta", block_size=block_size, force=force, quiet=quiet)
            if delta_out is not None:
                result["delta"] = str(delta_out)
        else:
            if sparsity is not None or k is not None or delta_out is not None or mask_out is not None:
                raise WeightopsError("--mask applies an existing mask: do not combine it with --sparsity/--k/--mask-out/--delta-out")
            mpath = Path(mask)
        if out is not None:
            m = open_sparse(mpath)
            res = apply_mask(base, finetuned, m, out, dtype=dtype, shard_size=shard_size, block_size=block_size,
                             force=force, quiet=quiet, command=command,
                             manifest_extra={"graft": m.manifest.get("method")})
            result["model"] = str(res.out)
            result["warnings"] = res.warnings
            m.close()
        info_from = mpath if mpath is not None else Path(delta_out)
        man = open_sparse(info_from, verify=False).manifest
        result["nnz"], result["method"] = man["nnz"], man.get("method")
        return result
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
