"""Recipes: `weightops run RECIPE.yaml`, the scripted mode of weightops.

A recipe is a YAML file: a list of steps, each a registered operation with its
options, run in order under one progress display, then a summary table.

    vars:                       # ${name} anywhere in a string; --set name=value overrides
      out: runs/port
    continue_on_error: false    # default: stop at the first failing step
    defaults:                   # options given to every step of a type
      patch-apply: {force: true}
    steps:
      - step: patch-create
        base: ${zoo:base}
        adapter: ${zoo:sentiment-lora-r8}
        out: ${out}/patch
      - step: patch-apply       # `targets` runs the step once per entry, the entry's options on top
        patch: ${out}/patch
        targets:
          - {to: models/v2, out: ${out}/v2}
          - {to: models/v3, out: ${out}/v3, scale: 0.8, rename: {'^bert\\.': 'model.'}}

Resolvers: `${env:NAME}`, `${here}` (the recipe's directory), `${zoo:NAME}`
(the zoo model's directory, built on demand). A string that is exactly one
`${name}` takes the variable's value with its YAML type. YAML anchors and
merge keys (`&x`, `*x`, `<<: *x`) work as usual; top-level keys starting
with `x-` are ignored, a place to define anchors. Relative paths are relative
to the working directory, as on the command line.

Every step's options are checked against its function's signature before
anything runs, so a typo in the last step fails in a second, not after an
hour. Each step writes its outputs atomically (a failed step leaves nothing);
outputs of earlier steps stay.

Steps register with `@recipe_step("name")` from the modules listed in
`STEP_MODULES`; a step is a plain library function (the Python API), called
with the recipe's options as keyword arguments plus `quiet=True` and
`command=[...]` when it takes them.
"""
from __future__ import annotations

import collections.abc
import importlib
import inspect
import json
import os
import re
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from weightops.errors import WeightopsError, check_finite

# Modules imported (once) to register their steps; add yours here.
STEP_MODULES: list[str] = ["weightops.patches.steps", "weightops.soup_steps"]
# Keyword arguments the runner sets itself; a recipe cannot.
RUNNER_ARGS = ("quiet", "command")
STEP_KEYS = ("step", "name", "targets", "continue_on_error")
TOP_KEYS = ("version", "vars", "defaults", "steps", "continue_on_error", "description")
_VAR = re.compile(r"\$\{([^}]*)\}")


@dataclass
class StepDef:
    name: str
    func: Callable[..., Any]
    summary: str
    detail: Callable[[Any], str] | None = None  # one line about a result, for the summary table


STEPS: dict[str, StepDef] = {}


def recipe_step(name: str, detail: Callable[[Any], str] | None = None):
    """Register a function as the recipe step `name` (its keyword arguments are the step's options)."""

    def deco(func):
        doc = (inspect.getdoc(func) or "").strip().splitlines()
        STEPS[name] = StepDef(name, func, doc[0] if doc else "", detail)
        return func

    return deco


def load_steps() -> dict[str, StepDef]:
    for mod in STEP_MODULES:
        importlib.import_module(mod)
    return STEPS


class RecipeError(WeightopsError):
    """A recipe that is invalid, or that ran and had a step fail (`result` holds what did run)."""

    def __init__(self, message: str, result: "RecipeResult | None" = None):
        super().__init__(message)
        self.result = result


@dataclass
class Run:
    """One call of a step: the recipe's step `index` (1-based), expanded per target."""

    index: int
    step: str
    label: str
    options: dict
    continue_on_error: bool
    status: str = "pending"  # ok | failed | not run | planned
    seconds: float = 0.0
    out: str | None = None
    detail: str = ""

    def to_json(self) -> dict:
        return {"index": self.index, "step": self.step, "label": self.label, "status": self.status,
                "seconds": round(self.seconds, 3), "out": self.out, "detail": self.detail, "options": self.options}


@dataclass
class RecipeResult:
    recipe: str
    runs: list[Run] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.status in ("ok", "planned") for r in self.runs)

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "ok": self.ok, "seconds": round(self.seconds, 3), "runs": [r.to_json() for r in self.runs]}

    def table(self) -> str:
        rows = [("#", "step", "target", "status", "time", "output / detail")]
        for r in self.runs:
            rows.append((str(r.index), r.step, r.label, r.status, f"{r.seconds:.1f}s" if r.status in ("ok", "failed") else "",
                         "  ".join(x for x in (r.out or "", r.detail) if x)))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5] for row in rows]
        if all(r.status == "planned" for r in self.runs):
            lines.append(f"{len(self.runs)} step(s) planned, nothing run (--dry-run)")
        else:
            lines.append(f"{sum(r.status == 'ok' for r in self.runs)}/{len(self.runs)} ok in {self.seconds:.1f} s")
        return "\n".join(line.rstrip() for line in lines)


# -- loading and variables ------------------------------------------------------------
def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}: invalid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with a 'steps' list")
    if "merge_method" in doc:  # a mergekit config: one `mergekit` step (weightops.soup_steps), out from --set out=
        doc = {"steps": [{"step": "mergekit", "config": str(path), "out": "${out}"}]}
    unknown = [k for k in doc if k not in TOP_KEYS and not str(k).startswith("x-")]
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key '{unknown[0]}' (keys: {', '.join(TOP_KEYS)}; "
                          "'x-' keys are free, e.g. for YAML anchors)")
    if not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise RecipeError(f"{path}: 'steps' must be a non-empty list")
    return doc


class _Vars:
    def __init__(self, values: dict, here: Path, dry_run: bool):
        self.values, self.here, self.dry_run = values, here, dry_run
        self._zoo: dict[str, str] = {}

    def lookup(self, key: str, where: str, depth: int = 0):
        key = key.strip()
        if key == "here":
            return str(self.here)
        if key.startswith("env:"):
            name = key[4:]
            if name not in os.environ:
                raise RecipeError(f"{where}: environment variable {name} is not set")
            return os.environ[name]
        if key.startswith("zoo:"):
            return self._zoo_path(key[4:], where)
        if key not in self.values:
            known = ", ".join(sorted(self.values)) or "none"
            raise RecipeError(f"{where}: unknown variable ${{{key}}} (defined: {known}; add it under vars: or pass --set {key}=...)")
        if depth > 20:
            raise RecipeError(f"{where}: variable ${{{key}}} refers to itself")
        return self.expand(self.values[key], where, depth + 1)

    def _zoo_path(self, name: str, where: str) -> str:
        if self.dry_run:
            return f"<zoo:{name}>"
        if name not in self._zoo:
            import weightops.zoo as zoo

            try:
                self._zoo[name] = str(zoo.get(name))
            except WeightopsError as e:
                raise RecipeError(f"{where}: ${{zoo:{name}}}: {e}") from None
        return self._zoo[name]

    def expand(self, value, where: str, depth: int = 0):
        if isinstance(value, str):
            m = _VAR.fullmatch(value)
            if m:  # exactly one variable: keep its type
                return self.lookup(m.group(1), where, depth)
            return _VAR.sub(lambda m: str(self.lookup(m.group(1), where, depth)), value)
        if isinstance(value, list):
            return [self.expand(v, where, depth) for v in value]
        if isinstance(value, dict):
            return {k: self.expand(v, where, depth) for k, v in value.items()}
        return value


def parse_set(items) -> dict:
    """--set name=value (value read as a YAML scalar: 0.5 is a number, true a bool)."""
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise RecipeError(f"--set '{item}' must look like name=value")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
    return out


def _label(step: str, options: dict) -> str:
    for key in ("out", "to", "finetuned", "adapter"):
        if isinstance(options.get(key), (str, os.PathLike)):
            return Path(str(options[key])).name
    return step


def plan_recipe(path, set_vars: dict | None = None, *, dry_run: bool = False,
                continue_on_error: bool | None = None) -> tuple[list[Run], dict]:
    """Read, expand and validate a recipe: every run with its final options, nothing executed."""
    path = Path(path)
    doc = _read_yaml(path)
    steps = load_steps()
    values = {**(doc.get("vars") or {}), **(set_vars or {})}
    variables = _Vars(values, path.resolve().parent, dry_run)
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict) or any(not isinstance(v, dict) for v in defaults.values()):
        raise RecipeError(f"{path}: 'defaults' maps a step name to its default options")
    for name in defaults:
        if name not in steps:
            raise RecipeError(f"{path}: defaults for unknown step '{name}' (steps: {', '.join(sorted(steps))})")
    stop_default = bool(doc.get("continue_on_error", False)) if continue_on_error is None else continue_on_error
    runs: list[Run] = []
    for i, item in enumerate(doc["steps"], 1):
        where = f"{path.name} step {i}"
        if not isinstance(item, dict) or "step" not in item:
            raise RecipeError(f"{where}: each step is a mapping with a 'step:' key (one of {', '.join(sorted(steps))})")
        name = item["step"]
        if name not in steps:
            raise RecipeError(f"{where}: unknown step '{name}' (steps: {', '.join(sorted(steps))})")
        where = f"{where} ({name})"
        base_opts = {**defaults.get(name, {}), **{k: v for k, v in item.items() if k not in STEP_KEYS}}
        targets = item.get("targets", [None])
        if not isinstance(targets, list) or not targets or any(t is not None and not isinstance(t, dict) for t in targets):
            raise RecipeError(f"{where}: 'targets' must be a non-empty list of option mappings")
        for j, t in enumerate(targets, 1):
            w = where if len(targets) == 1 else f"{where} target {j}"
            opts = variables.expand({**base_opts, **(t or {})}, w)
            _check_options(steps[name], opts, w)
            label = str(item.get("name") or _label(name, opts))
            runs.append(Run(i, name, label, opts, bool(item.get("continue_on_error", stop_default))))
    return runs, doc


def _check_options(step: StepDef, opts: dict, where: str) -> None:
    sig = inspect.signature(step.func)
    taken = [k for k in opts if k in RUNNER_ARGS]
    if taken:
        raise RecipeError(f"{where}: '{taken[0]}' is set by the runner, not by the recipe")
    params = {k: p for k, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and k not in RUNNER_ARGS}
    unknown = [k for k in opts if k not in params]
    if unknown:
        raise RecipeError(f"{where}: unknown option '{unknown[0]}' (options: {', '.join(params)})")
    missing = [k for k, p in params.items() if p.default is p.empty and k not in opts]
    if missing:
        raise RecipeError(f"{where}: missing option '{missing[0]}'")
    try:
        hints = typing.get_type_hints(step.func)
    except Exception:  # an annotation we cannot resolve: the step checks its own options
        hints = {}
    for k, v in opts.items():
        if k in hints and not _type_ok(v, hints[k]):
            raise RecipeError(f"{where}: option '{k}' should be {_type_name(hints[k])}, got {type(v).__name__} {v!r}")
        try:  # YAML's .nan/.inf (and 1e39) are numbers to YAML, garbage to every operator
            check_finite(**{k: v})
        except WeightopsError:
            raise RecipeError(f"{where}: option '{k}' must be finite numbers within the float32 range, got {v!r}") from None


def _type_ok(value, hint) -> bool:
    """Whether a YAML value fits a step's annotation. Only plain types are checked; anything else passes."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str or hint in (Path, os.PathLike):
        return isinstance(value, (str, Path))
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        # list[X], Sequence[X], tuple[X, ...]: every item an X; a fixed-length tuple[X, Y] is not checked
        item = args[0] if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis) else None
        return item is None or all(_type_ok(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "null"
    if hint in (Path, os.PathLike):
        return "a path"
    if args:
        return f"a list of ({_type_name(args[0])})"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


# -- running ----------------------------------------------------------------------------
def _summarize(step: StepDef, result) -> tuple[str | None, str]:
    out = getattr(result, "out", None)
    if out is None and isinstance(result, dict):
        out = result.get("out")
    detail = step.detail(result) if step.detail is not None else ""
    return (str(out) if out is not None else None), detail


def run_recipe(path, set_vars: dict | None = None, *, dry_run: bool = False, continue_on_error: bool | None = None,
               quiet: bool = False, force: bool = False) -> RecipeResult:
    """Run every step of a recipe in order; raises RecipeError (with `.result`) if a step failed.

    force: every step that takes `force` replaces its existing output (as `--force` on its command)."""
    from weightops.engine import nested_progress

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    runs, _ = plan_recipe(path, set_vars, dry_run=dry_run, continue_on_error=continue_on_error)
    result = RecipeResult(str(path), runs)
    if dry_run:
        for r in runs:
            r.status = "planned"
            r.detail = json.dumps(r.options, default=str)
        return result
    failures = []
    with tqdm(total=len(runs), desc="recipe", unit="step", disable=quiet, file=sys.stderr, dynamic_ncols=True) as bar:
        for k, r in enumerate(runs):
            step = STEPS[r.step]
            bar.set_postfix_str(f"{r.step} {r.label}")
            kwargs = dict(r.options)
            params = inspect.signature(step.func).parameters
            if "quiet" in params:
                kwargs["quiet"] = True  # one display: the recipe's
            if "command" in params:
                kwargs["command"] = ["weightops", "run", str(path), f"step {r.index}: {r.step} {r.label}"]
            if force and "force" in params:
                kwargs["force"] = True
            t1 = time.perf_counter()
            notes = []
            try:
                # the step's own byte counter and rate show under the recipe's bar
                with nested_progress(None if quiet else f"[{k + 1}/{len(runs)}] {r.step}"):
                    res = step.func(**kwargs)
                r.out, r.detail = _summarize(step, res)
                notes = list(getattr(res, "warnings", None) or [])
                r.status = "ok"
            except WeightopsError as e:
                r.status, r.detail = "failed", str(e)
                failures.append(r)
            r.seconds = time.perf_counter() - t1
            bar.update(1)
            if not quiet:
                bar.write(f"[{k + 1}/{len(runs)}] {r.step} {r.label}: {r.status} ({r.seconds:.1f} s)")
                for note in notes:
                    bar.write(f"    note: {note}")
            if r.status == "failed" and not r.continue_on_error:
                for rest in runs[k + 1:]:
                    rest.status = "not run"
                break
    result.seconds = time.perf_counter() - t0
    if failures:
        first = failures[0]
        left = sum(r.status == "not run" for r in runs)
        tail = f"; {left} step(s) not run" if left else ""
        more = f" ({len(failures)} steps failed)" if len(failures) > 1 else ""
        raise RecipeError(f"step {first.index} ({first.step} {first.label}) failed: {first.detail}{more}{tail}", result)
    return result


def write_report(result: RecipeResult, path) -> None:
    """The run's JSON report, written to a temp file and renamed (never half-written)."""
    from weightops.errors import OutputError

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def _merge_detail(res) -> str:
    m = res.manifest
    return f"{m.get('method')}: {len(m['outputs']['tensors'])} tensors, {res.bytes_written / 1e6:.1f} MB"


def _register_merge():
    from weightops.engine import merge

    recipe_step("merge", detail=_merge_detail)(merge)


_register_merge()
