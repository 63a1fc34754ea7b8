"""LT-SFT composition (Ansell et al. 2022): θ = θ0 + Σ s_i·δ_i for sparse deltas δ_i.

The paper composes by plain addition (s_i = 1, the default); the scales are
our knob. Before writing, a conflict report is computed from the sparse files
alone (no model read): for every pair of deltas and every tensor, how many
positions both deltas touch, and how many of those have opposite signs
(where one delta partly undoes the other). It is written next to the model as
`compose_report.json`.
"""
from __future__ import annotations

import torch

from weightops.errors import WeightopsError
from weightops.sparse.format import SparseFile, read_sparse_delta
from weightops.sparse.masks import layer_of

REPORT_NAME = "compose_report.json"


def conflict_report(deltas: list[SparseFile], labels: list[str] | None = None, top: int = 10) -> dict:
    """Pairwise support overlaps and sign conflicts, per layer group and for the `top` tensors with most overlap."""
    labels = labels or [d.path.name for d in deltas]
    pairs = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            a, b = deltas[i], deltas[j]
            per_tensor, per_layer = {}, {}
            overlap = conflicts = 0
            for name in a.tensors:
                if name not in b.tensors or a.tensors[name].nnz == 0 or b.tensors[name].nnz == 0:
                    continue
                ia, ib = a.indices(name), b.indices(name)
                hit_a = torch.isin(ia, ib)
                n = int(hit_a.sum())
                if n == 0:
                    continue
                hit_b = torch.isin(ib, ia)
                va, vb = a.values(name)[hit_a].float(), b.values(name)[hit_b].float()  # same sorted positions
                c = int(((va * vb) < 0).sum())
                per_tensor[name] = {"overlap": n, "sign_conflicts": c}
                g = per_layer.setdefault(layer_of(name), {"overlap": 0, "sign_conflicts": 0})
                g["overlap"] += n
                g["sign_conflicts"] += c
                overlap += n
                conflicts += c
            worst = sorted(per_tensor.items(), key=lambda kv: -kv[1]["overlap"])[:top]
            pairs.append({"a": labels[i], "b": labels[j], "nnz_a": a.nnz, "nnz_b": b.nnz, "overlap": overlap,
                          "sign_conflicts": conflicts, "per_layer": per_layer, "top_tensors": dict(worst)})
    return {"deltas": [{"label": lab, "path": str(d.path), "nnz": d.nnz, "sha256": d.sha256()} for lab, d in zip(labels, deltas)],
            "pairs": pairs, "disjoint": all(p["overlap"] == 0 for p in pairs),
            "note": "overlapping positions are summed; sign_conflicts counts positions where the deltas have opposite signs"}


def compose(base, deltas, out, *, scales=None, labels=None, dtype=None, shard_size="5GB", block_size=None,
            force: bool = False, quiet: bool = True, command=None):
    """Write θ0 + Σ s_i·δ_i; returns (MergeResult, conflict report)."""
    from weightops.sparse.apply import apply_sparse_delta

    ds = [d if isinstance(d, SparseFile) else read_sparse_delta(d) for d in deltas]
    if not ds:
        raise WeightopsError("compose needs at least one sparse delta")
    report = conflict_report(ds, labels)
    res = apply_sparse_delta(base, ds, out, scales=scales, dtype=dtype, shard_size=shard_size, block_size=block_size,
                             force=force, quiet=quiet, command=command,
                             manifest_extra={"compose": {"paper": "https://arxiv.org/abs/2110.07560",
                                                         "overlap": sum(p["overlap"] for p in report["pairs"]),
                                                         "sign_conflicts": sum(p["sign_conflicts"] for p in report["pairs"])}},
                             extra_json={REPORT_NAME: report})
    return res, report
