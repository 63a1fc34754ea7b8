"""The intruder report on disk: report.json, index.html and PNG plots (matplotlib, Agg).

Written into a temporary sibling directory and renamed into place
(`weightops.io.writer.atomic_dir`), so a failed run leaves nothing half-written.
"""
from __future__ import annotations

import html
import json
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(report: dict, path: Path) -> None:
    """Intruder counts at ε per layer × module type, one panel per target."""
    plt = _plt()
    targets = report["targets"]
    eps = report["params"]["eps"]
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets) + 1, 4.5), squeeze=False)
    vmax = max([max([m["count"] for m in t["matrices"]], default=0) for t in targets] + [1])
    im = None
    for ax, t in zip(axes[0], targets):
        layers = sorted({m["layer"] for m in t["matrices"]}, key=lambda x: (x is None, x if x is not None else 0))
        modules = list(dict.fromkeys(m["module"] for m in t["matrices"]))
        grid = [[0] * len(modules) for _ in layers]
        for m in t["matrices"]:
            grid[layers.index(m["layer"])][modules.index(m["module"])] += m["count"]
        im = ax.imshow(grid, aspect="auto", cmap="magma_r", vmin=0, vmax=vmax)
        ax.set_title(f"{t['label']}: {t['total']} intruders", fontsize=9)
        ax.set_xticks(range(len(modules)))
        ax.set_xticklabels(modules, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([str(x) for x in layers], fontsize=7)
        ax.set_ylabel("layer")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v and len(layers) * len(modules) <= 400:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=6, color="white" if v > vmax / 2 else "black")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=f"intruders at ε={eps:g}")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_counts_vs_eps(report: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in report["targets"]:
        xs = [float(e) for e in t["counts_vs_eps"]]
        ax.plot(xs, list(t["counts_vs_eps"].values()), marker="o", ms=3, label=t["label"])
    ax.axvline(report["params"]["eps"], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("ε (intruder iff max |cos| with every base singular vector < ε)")
    ax.set_ylabel(f"intruders in the top {report['params']['top_k']} (sum over matrices)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_detail(report: dict, spectrum_path: Path, cosine_path: Path) -> None:
    """The chosen matrix: singular values of W0 and of each W (intruders marked), and |cos| matrices."""
    plt = _plt()
    d = report["detail"]
    eps = report["params"]["eps"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(d["sigma_base"]) + 1), d["sigma_base"], color="black", lw=1, label="base W0")
    for t in d["targets"]:
        xs = list(range(1, len(t["sigma"]) + 1))
        line, = ax.plot(xs, t["sigma"], marker="o", ms=3, lw=0.8, label=t["label"])
        intr = [(x, s) for x, s, c in zip(xs, t["sigma"], t["best_cos"]) if c < eps]
        if intr:
            ax.scatter(*zip(*intr), s=80, facecolors="none", edgecolors=line.get_color(), lw=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("singular value rank (circled: intruder)")
    ax.set_ylabel("σ")
    ax.set_title(d["name"], fontsize=8)
    ax.legend(fontsize=8)
    fig.savefig(spectrum_path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    n = len(d["targets"])
    fig, axes = plt.subplots(n, 1, figsize=(8, 0.8 + 2.6 * n), squeeze=False)
    fig.subplots_adjust(hspace=0.55)
    for ax, t in zip(axes[:, 0], d["targets"]):
        rows, cols = len(t["cos"]), len(t["cos"][0]) if t["cos"] else 0
        im = ax.imshow(t["cos"], aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                       extent=(0.5, cols + 0.5, rows + 0.5, 0.5))  # ranks count from 1
        ax.set_title(f"{t['label']}: |cos(u_j(W), u_i(W0))|, best match of each row: ranks "
                     f"{t['best_base_rank']}", fontsize=7)
        ax.set_ylabel("W rank j")
        ax.set_yticks(range(1, rows + 1))
        ax.set_yticklabels([f"{j + 1}{'*' if c < eps else ''}" for j, c in enumerate(t["best_cos"])], fontsize=6)
    axes[-1, 0].set_xlabel("W0 singular vector rank i (* marks an intruder row)")
    fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.8)
    fig.savefig(cosine_path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _html(report: dict, plots: list[str]) -> str:
    p = report["params"]
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(t['label'])}</td><td>{esc(t['kind'])}</td><td>{t['total']}</td><td>{t['matrices_with_intruders']}"
        f"/{t['n_matrices']}</td><td>{esc(json.dumps(t['solvers']))}</td><td>{t['seconds']}</td></tr>"
        for t in report["targets"])
    parts = [f"<!doctype html><meta charset='utf-8'><title>weightops intruders</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{padding:2px 8px;text-align:left}"
             "table{border-collapse:collapse}tr:nth-child(even){background:#f3f3f3}</style>",
             f"<h1>Intruder dimensions</h1><p>base <code>{esc(report['base']['path'])}</code>; top-k = {p['top_k']}, "
             f"ε = {p['eps']:g}; {esc(report['definition'])}.</p>",
             "<table><tr><th>target</th><th>kind</th><th>intruders</th><th>matrices with intruders</th><th>solvers</th>"
             f"<th>seconds</th></tr>{rows}</table>"]
    parts += [f"<h2>{esc(title)}</h2><img src='{name}' style='max-width:100%'>" for title, name in plots]
    for t in report["targets"]:
        hit = [m for m in t["matrices"] if m["count"]]
        parts.append(f"<h2>{esc(t['label'])}: matrices with intruders at ε={p['eps']:g} ({len(hit)})</h2>")
        if hit:
            parts.append("<table><tr><th>matrix</th><th>count</th><th>intruder ranks (σ, best |cos|, matched base rank)</th>"
                         "<th>σmax ratio</th><th>‖ΔW‖/‖W0‖</th></tr>" + "".join(
                             f"<tr><td>{esc(m['name'])}</td><td>{m['count']}</td><td>"
                             + ", ".join(f"#{i['rank']} ({i['sigma']:.3g}, {i['best_cos']:.3f}, #{i['base_rank']})"
                                         for i in m["intruders"])
                             + f"</td><td>{m['spectral_norm_ratio']:.4f}</td><td>{m['delta_rel']:.4f}</td></tr>" for m in hit)
                         + "</table>")
    return "\n".join(parts) + "\n"


def write_report(report: dict, out_dir, *, force: bool = False) -> Path:
    """report.json, index.html and plots in `out_dir`, atomically."""
    from weightops.io.writer import atomic_dir

    with atomic_dir(out_dir, force=force) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        plots = [("Intruders per layer and module", "heatmap.png"), ("Intruders vs ε", "counts_vs_eps.png")]
        plot_heatmap(report, tmp / "heatmap.png")
        plot_counts_vs_eps(report, tmp / "counts_vs_eps.png")
        if report.get("detail"):
            plot_detail(report, tmp / "spectrum.png", tmp / "cosine.png")
            plots += [(f"Singular values of {report['detail']['name']}", "spectrum.png"),
                      (f"Cosine similarity of {report['detail']['name']}", "cosine.png")]
        (tmp / "index.html").write_text(_html(report, plots))
    return Path(out_dir)
