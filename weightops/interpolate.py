"""WiSE-FT interpolation between a base θ0 and a fine-tune θft, and what it shows per layer.

θ(α) = (1−α)·θ0 + α·θft, tensor by tensor, with α set per layer group:
- `sweep` scores θ(α) over a grid of α with one or more evaluators (the WiSE-FT
  curve, e.g. on an in-distribution and a shifted test set);
- `per_layer=True` sweeps α for one layer group at a time, every other group
  held at `rest_alpha` (default 1: the fine-tune), to find the groups that
  decide the score ("straggler" candidates);
- `sparsify` (a regex of tensor names) with `density` keeps only the top
  `density` fraction of |δ| = |θft − θ0| in those tensors (the rest reset to
  θ0) before interpolating;
- `path_stats` gives per-group ‖δ‖, ‖δ‖/‖θ0‖, and along the path the cosine of
  θ(α) to θ0 and the distance to θft (exact closed forms from one fp64 pass).

What is the paper's and what is ours ("In Search of the Successful
Interpolation", arXiv 2410.16476, whose code is not public): the WiSE-FT path
and the idea that a few straggler layers matter and that sparsifying their
change helps are the paper's; the per-layer sweep as the way to find them, the
straggler ranking (score range over the group's α sweep), magnitude
sparsification of δ, and the path statistics are ours (shared/methods.md).

Every model is written by the one streaming loop (`engine.run_streaming`), so
bf16/fp16 inputs are computed in fp32 and written back in their dtype, and
α = 0 and α = 1 reproduce θ0 and θft bit for bit (a weighted sum with weights 0
and 1, not θ0 + α·δ).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from weightops.errors import OutputError, WeightopsError, check_finite
from weightops.methods.base import Method

_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.")
_PREFIXES = ("model.", "bert.", "roberta.", "transformer.", "base_model.model.", "encoder.", "decoder.")


# --- layer groups -----------------------------------------------------------------------
def layer_group(name: str, group_by: str = "layer") -> str:
    """The group of a tensor: "layer.N" for transformer blocks, else the module ("embeddings",
    "classifier", "lm_head", ...); group_by="tensor" gives every tensor its own group, and any other
    value is a regex whose first capture group names the group ("other" when it does not match)."""
    if group_by == "tensor":
        return name
    if group_by == "layer":
        m = _LAYER.search(name)
        if m:
            return f"layer.{int(m.group(1))}"
        rest = name
        stripped = True
        while stripped:
            stripped = False
            for p in _PREFIXES:
                if rest.startswith(p) and "." in rest[len(p):]:
                    rest, stripped = rest[len(p):], True
        return rest.split(".")[0]
    m = _compile(group_by, "--group-by").search(name)
    return (m.group(1) if m.groups() else m.group(0)) if m else "other"


def _compile(regex: str, what: str) -> re.Pattern:
    try:
        return re.compile(regex)
    except re.error as e:
        raise WeightopsError(f"{what}: invalid regex '{regex}' ({e})") from None


def groups_of(names, group_by: str = "layer") -> dict[str, list[str]]:
    """Groups with their tensor names: what comes before the first layer, the layers by index, then the rest."""
    out: dict[str, list[str]] = {}
    first: dict[str, int] = {}
    for i, n in enumerate(names):
        g = layer_group(n, group_by)
        out.setdefault(g, []).append(n)
        first.setdefault(g, i)
    layer_pos = min((first[g] for g in out if re.fullmatch(r"layer\.\d+", g)), default=len(names))

    def order(g):
        m = re.fullmatch(r"layer\.(\d+)", g)
        if m:
            return (1, int(m.group(1)))
        return (0 if first[g] < layer_pos else 2, first[g])

    return {g: out[g] for g in sorted(out, key=order)}


def parse_alphas(text) -> list[float]:
    """"0:1:0.1" (start:stop:step, stop included) or "0,0.5,1" or a list of numbers."""
    if isinstance(text, (list, tuple)):
        vals = [float(x) for x in text]
    else:
        s = str(text).replace(" ", "")
        try:
            if ":" in s:
                parts = [float(x) for x in s.split(":")]
                if len(parts) != 3 or parts[2] <= 0:
                    raise ValueError
                start, stop, step = parts
                n = int(math.floor((stop - start) / step + 1e-9)) + 1
                vals = [round(start + i * step, 10) for i in range(max(n, 0))]
            else:
                vals = [float(x) for x in s.split(",") if x]
        except ValueError:
            raise WeightopsError(f"--alphas must be start:stop:step (step > 0) or comma-separated numbers, got '{text}'") from None
    if not vals or not all(math.isfinite(v) for v in vals):
        raise WeightopsError(f"--alphas gives no finite values: '{text}'")
    check_finite(alphas=vals)
    return vals


# --- the method ---------------------------------------------------------------------------
@dataclass
class PathPoint:
    """One model on the path: α per group (else `alpha`), and which tensors are sparsified."""

    alpha: float = 1.0
    alphas: dict[str, float] = field(default_factory=dict)
    group_by: str = "layer"
    sparsify: str | None = None  # regex of tensor names
    density: float = 1.0  # fraction of |δ| kept in sparsified tensors

    def alpha_of(self, name: str) -> float:
        if not self.alphas:
            return self.alpha
        return self.alphas.get(layer_group(name, self.group_by), self.alpha)

    def density_of(self, name: str) -> float:
        if self.sparsify is None or self.density >= 1.0:
            return 1.0
        return self.density if _compile(self.sparsify, "--sparsify-layers").search(name) else 1.0

    def as_dict(self) -> dict:
        d = {"alpha": self.alpha, "group_by": self.group_by}
        if self.alphas:
            d["alphas"] = dict(self.alphas)
        if self.sparsify is not None:
            d.update(sparsify=self.sparsify, density=self.density)
        return d


def sparsify_threshold(make_stream, numel: int, density: float) -> float:
    """|δ| threshold keeping the top `density` fraction (exact, streaming; ties at it are kept)."""
    from weightops import ops
    from weightops.methods.task_arithmetic import keep_count

    return ops.kth_largest_abs(make_stream, [keep_count(density, numel)])[0]


class Interpolate(Method):
    """θ(α) per tensor: (1−α)·θ0 + α·θft, or θ0 + α·keep⊙δ in sparsified tensors."""

    name = "interpolate"
    summary = "(1−α)·θ0 + α·θft per tensor, α per layer group; optional magnitude sparsification of δ"
    reference_url = "https://arxiv.org/abs/2109.01903"
    needs_base = True
    min_models = max_models = 1

    def prepare(self, job, p: PathPoint, model_state):
        alpha, density = p.alpha_of(job.name), p.density_of(job.name)
        thr = None
        if density < 1.0:
            def stream():
                for _, base, models in job.blocks():
                    yield models[0], base
            thr = sparsify_threshold(stream, job.numel, density)
        return alpha, thr

    def merge_block(self, job, p, state, start, base, models):
        import torch

        from weightops import ops

        alpha, thr = state
        if thr is not None:
            # θ0 + α·keep⊙δ: elements outside the kept set stay exactly θ0
            return ops.delta_merge(base, models, [alpha], lo=[thr], hi=[math.inf], out_dtype=torch.float32)
        return ops.weighted_sum([base, models[0]], [1.0 - alpha, alpha], out_dtype=torch.float32)


def interpolate(base, ft, *, out, alpha: float = 0.5, alphas: dict[str, float] | None = None,
                group_by: str = "layer", sparsify: str | None = None, density: float = 1.0, quiet: bool = False,
                **engine_kw):
    """Write θ(α) (α per group in `alphas`, else `alpha`) to `out`; ft may be a LoRA adapter on base."""
    point = PathPoint(alpha=alpha, alphas=dict(alphas or {}), group_by=group_by, sparsify=sparsify, density=density)
    _check_point(point)
    return _write(base, ft, point, out, quiet=quiet, **engine_kw)


def _check_point(p: PathPoint) -> None:
    check_finite(alpha=p.alpha, alphas=p.alphas, density=p.density)
    if not (0.0 < p.density <= 1.0):
        raise WeightopsError(f"--density must be in (0, 1], got {p.density}")
    if p.sparsify is not None:
        _compile(p.sparsify, "--sparsify-layers")
    if p.group_by not in ("layer", "tensor"):
        _compile(p.group_by, "--group-by")


def _write(base, ft, point: PathPoint, out, *, quiet=True, command=None, **engine_kw):
    from weightops.engine import run_streaming
    from weightops.io.checkpoint import Checkpoint, open_source

    base_src = Checkpoint(base)
    return run_streaming(Interpolate(), point, base_src, [open_source(ft, base_src)], out=out, quiet=quiet,
                         command=command, manifest_extra={"interpolation": point.as_dict()}, **engine_kw)


# --- path statistics -------------------------------------------------------------------------
def path_stats(base, ft, *, alphas, group_by: str = "layer", sparsify: str | None = None, density: float = 1.0,
               block_size: int | None = None) -> dict:
    """Per group: ‖θ0‖, ‖δ‖, ‖δ‖/‖θ0‖, cos(kept δ, δ), and for each α: ‖θ(α)−θ0‖/‖θ0‖,
    cos(θ(α), θ0) and ‖θ(α)−θft‖/‖δ‖ (float tensors only, fp64 sums in one pass)."""
    import torch

    from weightops.engine import DEFAULT_BLOCK_SIZE
    from weightops.io.checkpoint import Checkpoint, open_source

    point = PathPoint(group_by=group_by, sparsify=sparsify, density=density)
    _check_point(point)
    bs = int(block_size or DEFAULT_BLOCK_SIZE)
    b_src = Checkpoint(base)
    f_src = open_source(ft, b_src)
    names = [n for n, i in b_src.infos.items() if i.is_float and n in f_src.infos]
    sums: dict[str, list[float]] = {}  # group -> [θ0·θ0, δ·δ, m·m, θ0·m, δ·m] with m the kept δ
    try:
        for name in names:
            numel = b_src.infos[name].numel
            ranges = [(s, min(numel, s + bs)) for s in range(0, numel, bs)]

            def stream(name=name, ranges=ranges):
                for s, e in ranges:
                    yield f_src.read(name, s, e), b_src.read(name, s, e)

            d_ = point.density_of(name)
            thr = sparsify_threshold(stream, numel, d_) if d_ < 1.0 else None
            acc = sums.setdefault(layer_group(name, group_by), [0.0] * 5)
            for s, e in ranges:
                b = b_src.read(name, s, e).double()
                d = f_src.read(name, s, e).double() - b
                if thr is not None:
                    # the same keep rule as ops.delta_merge: |δ| in fp32 compared with the fp32 threshold
                    keep = (f_src.read(name, s, e).float() - b_src.read(name, s, e).float()).abs() >= thr
                    m = torch.where(keep, d, torch.zeros_like(d))
                else:
                    m = d
                for i, v in enumerate((b @ b, d @ d, m @ m, b @ m, d @ m)):
                    acc[i] += float(v)
                b_src.release(name, s, e)
                f_src.release(name, s, e)
    finally:
        b_src.close()
        f_src.close()
    out = {}
    for g, (bb, dd, mm, bm, dm) in sums.items():
        nb, nd = math.sqrt(bb), math.sqrt(dd)
        row = {"base_norm": nb, "delta_norm": nd, "rel_delta": nd / nb if nb else None,
               "kept_delta_cos": dm / (nd * math.sqrt(mm)) if dd and mm else None,
               "rel_change": [], "cos_to_base": [], "dist_to_ft": []}
        for a in alphas:
            na = math.sqrt(max(bb + 2 * a * bm + a * a * mm, 0.0))
            row["rel_change"].append(a * math.sqrt(mm) / nb if nb else None)
            row["cos_to_base"].append((bb + a * bm) / (nb * na) if nb and na else None)
            row["dist_to_ft"].append(math.sqrt(max(a * a * mm - 2 * a * dm + dd, 0.0)) / nd if nd else None)
        out[g] = row
    return out


# --- sweeps ------------------------------------------------------------------------------------
def named_evaluators(evals, cache_dir=None, cache: bool = True) -> dict:
    """{name: Evaluator} from a dict, one spec/callable, or a list of "name=spec" / spec strings."""
    from weightops.evaluate import make_evaluator

    if isinstance(evals, dict):
        items = list(evals.items())
    else:
        items = []
        for i, e in enumerate(evals if isinstance(evals, (list, tuple)) else [evals]):
            name = f"eval{i + 1}" if len(evals if isinstance(evals, (list, tuple)) else [evals]) > 1 else "score"
            if isinstance(e, str) and "=" in e.split(":", 1)[0]:
                name, e = e.split("=", 1)
            items.append((name, e))
    if not items:
        raise WeightopsError("give at least one --eval")
    if len({n for n, _ in items}) != len(items):
        raise WeightopsError("--eval names must differ (name=spec)")
    return {n: make_evaluator(e, cache_dir=cache_dir, cache=cache) for n, e in items}


def score_points(base, ft, points: list[PathPoint], evaluators: dict, *, workers: int = 1, quiet: bool = False,
                 desc: str = "candidates", **engine_kw) -> list[dict[str, float]]:
    """Write each point to a scratch dir, score it with every evaluator, delete it; in order."""
    from tqdm.auto import tqdm

    from weightops.evaluate import evaluate_many, scratch_dir

    results: list[dict[str, float]] = []
    batch = max(1, int(workers))
    with tqdm(total=len(points), desc=desc, disable=quiet, unit="model") as bar:
        for i in range(0, len(points), batch):
            with scratch_dir() as d:
                dirs = []
                for j, p in enumerate(points[i:i + batch]):
                    dirs.append(_write(base, ft, p, d / f"c{j}", quiet=True, **engine_kw).out)
                scores = {n: evaluate_many(ev, dirs, workers=workers) for n, ev in evaluators.items()}
            for j in range(len(dirs)):
                results.append({n: s[j] for n, s in scores.items()})
            bar.update(len(dirs))
    return results


def sweep(base, ft, *, alphas, evals, out=None, per_layer: bool = False, group_by: str = "layer",
          rest_alpha: float = 1.0, groups: list[str] | None = None, sparsify: str | None = None,
          density: float = 1.0, compare_dense: bool = True, workers: int = 1, plot: bool = True,
          force: bool = False, quiet: bool = False, cache_dir=None, cache: bool = True, **engine_kw) -> dict:
    """The WiSE-FT curve (and with per_layer, one curve per layer group); JSON and PNGs in `out`.

    Returns {"alphas", "curve": {eval: [score per α]}, "curve_dense" (with sparsify), "per_layer":
    {group: {eval: [...]}}, "stragglers", "path_stats"}.
    """
    from weightops.io.checkpoint import Checkpoint
    from weightops.io.writer import atomic_dir

    alphas = parse_alphas(alphas)
    check_finite(rest_alpha=rest_alpha)
    evaluators = named_evaluators(evals, cache_dir, cache)
    point = PathPoint(group_by=group_by, sparsify=sparsify, density=density)
    _check_point(point)
    if out is not None and Path(out).exists() and not force:
        raise OutputError(f"{out} exists; pass --force to replace it")
    src = Checkpoint(base)
    all_groups = groups_of([n for n, i in src.infos.items() if i.is_float], group_by)
    src.close()
    if groups:
        unknown = [g for g in groups if g not in all_groups]
        if unknown:
            raise WeightopsError(f"unknown layer group(s) {', '.join(unknown)}; groups are {', '.join(all_groups)}")
    sel = list(groups or all_groups)

    res = {"base": str(base), "ft": str(ft), "alphas": alphas, "evaluators": {n: e.name for n, e in evaluators.items()},
           "interpolation": point.as_dict()}
    pts = [PathPoint(alpha=a, group_by=group_by, sparsify=sparsify, density=density) for a in alphas]
    scores = score_points(base, ft, pts, evaluators, workers=workers, quiet=quiet, desc="α sweep", **engine_kw)
    res["curve"] = {n: [s[n] for s in scores] for n in evaluators}
    if sparsify is not None and density < 1.0 and compare_dense:
        dense = [PathPoint(alpha=a, group_by=group_by) for a in alphas]
        scores = score_points(base, ft, dense, evaluators, workers=workers, quiet=quiet, desc="dense α sweep", **engine_kw)
        res["curve_dense"] = {n: [s[n] for s in scores] for n in evaluators}
    if per_layer:
        pts = [PathPoint(alpha=rest_alpha, alphas={g: a}, group_by=group_by, sparsify=sparsify, density=density)
               for g in sel for a in alphas]
        scores = score_points(base, ft, pts, evaluators, workers=workers, quiet=quiet, desc="per-layer sweep", **engine_kw)
        k = len(alphas)
        res["rest_alpha"] = rest_alpha
        res["per_layer"] = {g: {n: [s[n] for s in scores[i * k:(i + 1) * k]] for n in evaluators}
                            for i, g in enumerate(sel)}
        res["stragglers"] = rank_stragglers(res["per_layer"], alphas)
    res["path_stats"] = path_stats(base, ft, alphas=alphas, group_by=group_by, sparsify=sparsify, density=density,
                                   block_size=engine_kw.get("block_size"))
    res["evaluations"] = {n: {"computed": e.calls, "cached": e.hits} for n, e in evaluators.items()}
    if out is not None:
        with atomic_dir(out, force) as tmp:
            (tmp / "interpolation.json").write_text(json.dumps(res, indent=2) + "\n")
            if plot:
                plot_sweep(res, tmp)
        res["out"] = str(out)
    return res


def rank_stragglers(per_layer: dict, alphas: list[float]) -> dict:
    """Per evaluator, groups ranked by how much their own α moves the score (max − min over the sweep)."""
    names = next(iter(per_layer.values())).keys() if per_layer else []
    out = {}
    for n in names:
        rows = []
        for g, by_eval in per_layer.items():
            s = by_eval[n]
            best = max(range(len(s)), key=lambda i: (s[i], -i))
            rows.append({"group": g, "range": max(s) - min(s), "best_alpha": alphas[best], "best": s[best],
                         "worst": min(s)})
        out[n] = sorted(rows, key=lambda r: -r["range"])
    return out


def plot_sweep(res: dict, out: Path) -> list[Path]:
    """curve.png (score vs α per evaluator), and with a per-layer sweep per_layer.png (group × α heatmaps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    a = res["alphas"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (n, s) in enumerate(res["curve"].items()):
        ax.plot(a, s, marker="o", color=f"C{i}", label=n + (" (sparsified)" if "curve_dense" in res else ""))
        if "curve_dense" in res:
            ax.plot(a, res["curve_dense"][n], ls="--", color=f"C{i}", alpha=0.7, label=f"{n} (dense)")
    ax.set_xlabel("α  (0 = base, 1 = fine-tuned)")
    ax.set_ylabel("score (higher is better)")
    ax.set_title("WiSE-FT interpolation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files.append(out / "curve.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    if "per_layer" in res:
        groups = list(res["per_layer"])
        names = list(res["curve"])
        fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.5 * (len(names) + 1), 0.35 * len(groups) + 2), squeeze=False)
        for ax, n in zip(axes[0], names):
            m = [[res["per_layer"][g][n][j] for j in range(len(a))] for g in groups]
            im = ax.imshow(m, aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(a)), [f"{x:g}" for x in a], rotation=90)
            ax.set_yticks(range(len(groups)), groups)
            ax.set_xlabel(f"α of the group (others at {res['rest_alpha']:g})")
            ax.set_title(n)
            fig.colorbar(im, ax=ax)
        ax = axes[0][-1]
        stats = res["path_stats"]
        ax.barh(range(len(groups)), [stats[g]["rel_delta"] or 0 for g in groups])
        ax.set_yticks(range(len(groups)), groups)
        ax.invert_yaxis()
        ax.set_xlabel("‖δ‖ / ‖θ0‖")
        ax.set_title("relative change per group")
        fig.tight_layout()
        files.append(out / "per_layer.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files
