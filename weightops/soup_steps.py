"""Recipe steps for soups, interpolation and mergekit configs (registered in weightops.recipes.STEP_MODULES).

    - step: soup            # weightops soup
      models: [${zoo:sentiment-ft-lr1e-4-s0}, ...]
      method: greedy
      eval: zoo:sentiment:validation
      out: ${out}/soup
    - step: interpolate     # weightops interpolate (a sweep with eval, else one model at alpha)
      base: ${zoo:base}
      ft: ${out}/soup
      alphas: "0:1:0.1"   # quoted (YAML reads unquoted 0:1:0.1 as a base-60 number) or a list
      eval: {id: zoo:sentiment:test, ood: zoo:sentiment:test_shifted}
      out: ${out}/wise
    - step: mergekit        # a mergekit YAML config (a file or the mapping inline)
      config: mergekit.yml
      out: ${out}/merged
A file whose top level has `merge_method` is a mergekit config and runs as
one `mergekit` step: `weightops run mergekit.yml --set out=DIR`.
"""
from __future__ import annotations

from weightops.recipes import recipe_step


def _soup_detail(r) -> str:
    s = f"{r.method}: {len(r.ingredients)} ingredient(s)"
    return s + (f", score {r.score:.4g}" if r.score is not None else "")


def _interp_detail(r) -> str:
    if isinstance(r, dict):
        first = next(iter(r["curve"]))
        c = r["curve"][first]
        best = max(range(len(c)), key=lambda i: c[i])
        return f"{first}: best α {r['alphas'][best]:g} ({c[best]:.4g}); α=1 {c[-1]:.4g}"
    return f"{r.bytes_written / 1e6:.1f} MB"


def _mergekit_detail(r) -> str:
    mk = r.manifest["mergekit"]
    return f"{mk['merge_method']}" + (f"; {len(mk['notes'])} note(s)" if mk["notes"] else "")


@recipe_step("soup", detail=_soup_detail)
def soup_step(models: list, out, method: str = "uniform", eval=None, accept: str = "ge", workers: int = 1,
              learn_on=None, per_layer: bool = False, group_by: str = "layer", steps: int = 60, lr: float = 0.1,
              batch_size: int = 32, seed: int = 0, dtype=None, shard_size="5GB", force: bool = False,
              quiet: bool = True, command=None):
    """Uniform, greedy or learned soup of fine-tuned models (see `weightops soup`)."""
    from weightops.soup import soup

    return soup(models, out=out, method=method, evaluator=eval, accept=accept, workers=workers, learn_on=learn_on,
                per_layer=per_layer, group_by=group_by, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                dtype=dtype, shard_size=shard_size, force=force, quiet=quiet, command=command)


@recipe_step("interpolate", detail=_interp_detail)
def interpolate_step(base, ft, out, alphas="0:1:0.1", alpha=None, eval=None, per_layer: bool = False,
                     groups=None, group_by: str = "layer", rest_alpha: float = 1.0, sparsify_layers=None,
                     density: float = 1.0, workers: int = 1, dtype=None, force: bool = False, quiet: bool = True,
                     command=None):
    """WiSE-FT sweep scored by `eval` (report dir), or with `alpha` one interpolated model (see `weightops interpolate`)."""
    from weightops.errors import WeightopsError
    from weightops.interpolate import interpolate, sweep

    if alpha is not None:
        if eval is not None:
            raise WeightopsError("interpolate step: give either alpha (write one model) or eval (sweep), not both")
        return interpolate(base, ft, out=out, alpha=alpha, sparsify=sparsify_layers, density=density, dtype=dtype,
                           force=force, quiet=quiet, command=command)
    if eval is None:
        raise WeightopsError("interpolate step: give eval (a sweep) or alpha (one model)")
    if isinstance(alphas, (int, float)):
        raise WeightopsError(f"interpolate step: alphas is the number {alphas}; quote start:stop:step in YAML "
                             "(alphas: \"0:1:0.1\", unquoted it is read as base 60) or give a list")
    return sweep(base, ft, alphas=alphas, evals=eval, out=out, per_layer=per_layer, groups=groups,
                 group_by=group_by, rest_alpha=rest_alpha, sparsify=sparsify_layers, density=density,
                 workers=workers, dtype=dtype, force=force, quiet=quiet)


@recipe_step("mergekit", detail=_mergekit_detail)
def mergekit_step(config, out, seed: int = 0, dtype=None, force: bool = False, quiet: bool = True, command=None):
    """Run a mergekit YAML config (file or inline mapping) with the streaming engine."""
    from weightops.mergekit_compat import mergekit_merge

    return mergekit_merge(config, out, seed=seed, dtype=dtype, force=force, quiet=quiet, command=command)
