"""Set operations on masks and their overlap statistics.

Union / intersection work tensor by tensor on the sorted index arrays (a
tensor's indices are held at once: nnz per tensor, never the model). A
sparse delta is accepted wherever a mask is (its support is the mask).

Overlap between masks i and j, per layer and overall (Panigrahi et al. use
the asymmetric ratio; we report both and name them):
    jaccard(i, j) = |γi ∩ γj| / |γi ∪ γj|
    asym(i, j)    = |γi ∩ γj| / |γj|     (the share of mask j that mask i also selects)
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from weightops.errors import AlignmentError, WeightopsError
from weightops.sparse.format import SparseFile, SparseWriter, open_sparse

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_of(name: str) -> str:
    """'layer 3' for tensors inside transformer block 3, else 'other' (embeddings, heads, final norms)."""
    m = _LAYER.search(name)
    return f"layer {int(m.group(1))}" if m else "other"


def _open_all(masks) -> list[SparseFile]:
    fs = [m if isinstance(m, SparseFile) else open_sparse(m) for m in masks]
    shapes: dict[str, tuple] = {}
    for f in fs:
        for n, t in f.tensors.items():
            if shapes.setdefault(n, t.shape) != t.shape:
                raise AlignmentError(f"tensor '{n}' is {list(t.shape)} in {f.path} but {list(shapes[n])} in another mask")
    return fs


def _support(f: SparseFile, name: str) -> torch.Tensor | None:
    """Sorted int64 indices of `name`, None for a dense (whole-tensor) entry."""
    return None if f.tensors[name].dense else f.indices(name)


def combine_masks(masks, out, op: str = "union", *, force: bool = False) -> Path:
    """Union or intersection of masks (tensor sets united / intersected too)."""
    if op not in ("union", "intersection"):
        raise WeightopsError(f"op must be union or intersection, got {op}")
    fs = _open_all(masks)
    if len(fs) < 2:
        raise WeightopsError(f"{op} needs at least two masks")
    names = list(dict.fromkeys(n for f in fs for n in f.tensors))
    if op == "intersection":
        names = [n for n in names if all(n in f.tensors for f in fs)]
    manifest = {"method": {"name": op, "inputs": [{"path": str(f.path), "sha256": f.sha256(), "nnz": f.nnz} for f in fs]},
                "sources": [s for f in fs for s in f.manifest.get("sources", [])]}
    with SparseWriter(out, "mask", manifest, force=force) as w:
        for n in names:
            t = next(f.tensors[n] for f in fs if n in f.tensors)
            sups = [_support(f, n) for f in fs if n in f.tensors]
            if op == "union":
                if any(s is None for s in sups):
                    w.write_tensor(n, t.shape, t.dtype, None)
                    continue
                idx = torch.unique(torch.cat(sups))
            else:
                sups = [s for s in sups if s is not None]
                if not sups:
                    w.write_tensor(n, t.shape, t.dtype, None)
                    continue
                idx = sups[0]
                for s in sups[1:]:
                    idx = idx[torch.isin(idx, s)]
            w.write_tensor(n, t.shape, t.dtype, idx)
        return w.commit()


def overlap(masks, labels: list[str] | None = None) -> dict:
    """Counts and ratios of pairwise overlap, per layer and overall (see the module docstring)."""
    fs = _open_all(masks)
    n = len(fs)
    labels = labels or [f.path.name for f in fs]
    if len(labels) != n:
        raise WeightopsError(f"{n} masks but {len(labels)} labels")
    size: dict[str, list[int]] = {}
    inter: dict[str, list[list[int]]] = {}
    names = list(dict.fromkeys(nm for f in fs for nm in f.tensors))
    for nm in names:
        g = layer_of(nm)
        size.setdefault(g, [0] * n)
        inter.setdefault(g, [[0] * n for _ in range(n)])
        sups = [(_support(f, nm) if nm in f.tensors else torch.zeros(0, dtype=torch.int64)) for f in fs]
        numel = next(f.tensors[nm].numel for f in fs if nm in f.tensors)
        for i in range(n):
            size[g][i] += numel if sups[i] is None else sups[i].numel()
            for j in range(i, n):
                a, b = sups[i], sups[j]
                if a is None:
                    c = numel if b is None else b.numel()
                elif b is None:
                    c = a.numel()
                else:
                    c = int(torch.isin(a, b).sum()) if i != j else a.numel()
                inter[g][i][j] += c
                inter[g][j][i] = inter[g][i][j]

    def ratios(sz, it):
        jac = [[(it[i][j] / (sz[i] + sz[j] - it[i][j]) if sz[i] + sz[j] - it[i][j] else float("nan")) for j in range(n)] for i in range(n)]
        asym = [[(it[i][j] / sz[j] if sz[j] else float("nan")) for j in range(n)] for i in range(n)]
        return {"size": sz, "intersection": it, "jaccard": jac, "asym": asym}

    groups = sorted(size, key=lambda g: (g == "other", int(g.split()[1]) if g != "other" else 0))
    tot_sz = [sum(size[g][i] for g in groups) for i in range(n)]
    tot_it = [[sum(inter[g][i][j] for g in groups) for j in range(n)] for i in range(n)]
    return {"labels": labels, "masks": [str(f.path) for f in fs], "overall": ratios(tot_sz, tot_it),
            "per_layer": {g: ratios(size[g], inter[g]) for g in groups},
            "definitions": {"jaccard": "|i ∩ j| / |i ∪ j|", "asym": "|i ∩ j| / |j| (row i, column j)"}}


def overlap_table(report: dict) -> str:
    """Plain-text table: one row per mask pair and layer group (Jaccard, both asymmetric ratios, counts)."""
    labels = report["labels"]
    n = len(labels)
    rows = [("pair", "group", "|i|", "|j|", "|i∩j|", "jaccard", "|i∩j|/|j|", "|i∩j|/|i|")]
    for i in range(n):
        for j in range(i + 1, n):
            for g, r in list(report["per_layer"].items()) + [("overall", report["overall"])]:
                rows.append((f"{labels[i]} vs {labels[j]}", g, str(r["size"][i]), str(r["size"][j]),
                             str(r["intersection"][i][j]), f"{r['jaccard'][i][j]:.4f}", f"{r['asym'][i][j]:.4f}",
                             f"{r['asym'][j][i]:.4f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)


def write_atomic(path, write) -> Path:
    """Run write(tmp_path) and rename the result into place, so a failure leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def overlap_heatmap(report: dict, png) -> Path:
    """Overall Jaccard and asymmetric overlap matrices, and per-layer Jaccard of each pair, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = report["labels"]
    n = len(labels)
    groups = list(report["per_layer"])
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    fig, axes = plt.subplots(1, 3, figsize=(6 + 0.5 * len(groups) + 2 * n, 3.2 + 0.3 * max(n, len(pairs))),
                             gridspec_kw={"width_ratios": [n, n, max(len(groups), 1)]})
    for ax, key, title in ((axes[0], "jaccard", "Jaccard |i∩j|/|i∪j|"), (axes[1], "asym", "|i∩j| / |j| (row i, col j)")):
        m = torch.tensor(report["overall"][key]).numpy()
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n), labels, rotation=45, ha="right")
        ax.set_yticks(range(n), labels)
        ax.set_title(title, fontsize=9)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", color="w" if m[i, j] < 0.6 else "k", fontsize=8)
    if pairs:
        grid = torch.tensor([[report["per_layer"][g]["jaccard"][i][j] for g in groups] for i, j in pairs])
        im = axes[2].imshow(grid.numpy(), vmin=0, vmax=max(float(grid.nan_to_num().max()), 1e-6), cmap="magma", aspect="auto")
        axes[2].set_xticks(range(len(groups)), groups, rotation=45, ha="right")
        axes[2].set_yticks(range(len(pairs)), [f"{labels[i]} vs {labels[j]}" for i, j in pairs])
        axes[2].set_title("Jaccard per layer", fontsize=9)
        fig.colorbar(im, ax=axes[2])
    else:
        axes[2].axis("off")
    fig.tight_layout()

    def save(tmp):
        fig.savefig(tmp, dpi=120, format="png")
    try:
        return write_atomic(png, save)
    finally:
        plt.close(fig)

