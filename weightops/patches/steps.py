"""Recipe steps for patches: patch-create, patch-check, patch-apply (see weightops.recipes)."""
from __future__ import annotations

from weightops.patches.apply import apply_patch
from weightops.patches.check import check_patch
from weightops.patches.create import create_patch
from weightops.recipes import recipe_step


def _create_detail(r: dict) -> str:
    return f"{r['source']} patch, {len(r['entries'])} targets, {r['bytes'] / 1e6:.2f} MB"


def _apply_detail(res) -> str:
    p = res.manifest["patch"]
    return f"{p['targets']} targets, scale {p['scale']:g}, {res.bytes_written / 1e6:.1f} MB"


def _check_detail(rep) -> str:
    if not rep.drift:
        return f"{len(rep.mapping)} targets fit"
    worst = max(rep.drift, key=lambda x: x["drift_over_patch"])
    return f"{len(rep.mapping)} targets fit; max ‖v2−v1‖/‖ΔW‖ {worst['drift_over_patch']:.3g} ({worst['target']})"


@recipe_step("patch-check", detail=_check_detail)
def patch_check(patch, to, source=None, rename=None, allow_dtype_mix: bool = False, quiet: bool = True):
    """Check that a patch fits a target version (fails the step if not); with `source` (V1), the drift report."""
    rep = check_patch(patch, to, source=source, rename=rename, allow_dtype_mix=allow_dtype_mix, quiet=quiet)
    rep.raise_if_incompatible()
    return rep


recipe_step("patch-create", detail=_create_detail)(create_patch)
recipe_step("patch-apply", detail=_apply_detail)(apply_patch)
