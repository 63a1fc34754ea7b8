"""Run mergekit YAML configs with weightops, for the methods both implement.

    weightops run mergekit.yml --set out=merged         # a mergekit config is a one-step recipe
    from weightops.mergekit_compat import translate, mergekit_merge

Mapping (mergekit semantics read from arcee-ai/mergekit, merge_methods/ and
sparsify.py; see docs/soups.md for the table):
- methods: linear, task_arithmetic, ties, dare_linear, dare_ties,
  breadcrumbs, slerp, model_stock. Anything else (della, sce, nuslerp,
  multislerp, karcher, passthrough, nearswap, arcee_fusion, ram,
  breadcrumbs_ties) is refused by name.
- `weight` → --weights; `lambda` → --lambda; `t` (slerp: 0 = base_model) → --t
  with the models ordered [base_model, other].
- `density`: ties/breadcrumbs → --density (magnitude KEEP fraction, per tensor:
  --trim-scope tensor, as mergekit); dare_* → --drop-rate 1 − density (mergekit's
  density is the KEEP probability). `gamma` → --gamma.
- `rescale` (dare_*, default true) → --rescale l1 (mergekit's L1-norm match);
  false → --rescale none.
- `normalize`: linear → --normalize; task_arithmetic/dare_linear/breadcrumbs
  (default false) → with true, weights are divided by their sum; ties-consensus
  methods: true (ties' default) is our disjoint weighted mean; false (dare_ties'
  default) sums the agreeing deltas without dividing (`TiesSum` below).
- `int8_mask` is ignored with a note (a memory trick of mergekit's; results
  are the same); `dtype`/`out_dtype` → --dtype (we compute in fp32 whatever the
  dtype; mergekit computes in `dtype`, so low-precision merges differ slightly).
- gradients (`[a, b, c]` over layers, t = layer / (L − 1), 0 for tensors
  outside the layers) and `filter` conditions (substring of the tensor name)
  are evaluated per tensor, as mergekit does.
- per-model `density` may differ between models for ties (one threshold per
  model); DARE drop rates and breadcrumbs gammas must be equal across models.
- Refused with a named reason: `slices` that do not cover every layer of every
  model identically (frankenmerges), `model+lora` references, hub names that
  are not local directories, unknown parameters. (`translate` only: `plan_config`
  runs every config; `tokenizer_source`, `tokenizer` and `chat_template` are
  planned by weightops.tokenizer_merge and have no `weightops merge` equivalent.)
Known differences: mergekit keeps int(density·n) elements (floor), we keep
round(density·n); DARE masks come from our Philox stream (deterministic from
`--seed`), not from torch's global RNG, so DARE merges are not bit-comparable
with mergekit's.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightops.errors import WeightopsError
from weightops.methods.base import MergeParams, Method

SUPPORTED = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "slerp", "model_stock")
KNOWN_ELSEWHERE = ("della", "della_linear", "sce", "nuslerp", "multislerp", "karcher", "passthrough", "nearswap",
                   "arcee_fusion", "ram", "ramplus_tl", "breadcrumbs_ties")
TIES_CONSENSUS = ("ties", "dare_ties")
# mergekit's default `normalize` per method
DEFAULT_NORMALIZE = {"linear": True, "ties": True, "dare_ties": False, "dare_linear": False, "task_arithmetic": False,
                     "breadcrumbs": False}
MODEL_PARAMS = {"weight", "density", "gamma"}
GLOBAL_PARAMS = {"normalize", "lambda", "int8_mask", "rescale", "t", "weight", "density", "gamma"}
TOP_KEYS = {"merge_method", "models", "slices", "modules", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "tokenizer", "chat_template", "name"}
_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.")


class MergekitError(WeightopsError):
    """A mergekit config weightops cannot run (the message names the feature)."""


def load_config(config) -> dict:
    """A mergekit config from a dict, a YAML file or YAML text."""
    import yaml

    if isinstance(config, dict):
        return config
    p = Path(str(config))
    try:
        doc = yaml.safe_load(p.read_text()) if p.is_file() else None
    except yaml.YAMLError as e:
        raise MergekitError(f"{p}: invalid YAML ({e})") from None
    if doc is None and not p.is_file():
        raise MergekitError(f"{config}: no such mergekit config file")
    if not isinstance(doc, dict) or "merge_method" not in doc:
        raise MergekitError(f"{config}: not a mergekit config (no merge_method)")
    return doc


# --- parameter values: scalars, gradients, filters ---------------------------------------------
def evaluate_setting(name: str, setting, t: float):
    """mergekit's config.evaluate_setting: a scalar; a gradient over t ∈ [0, 1] (numbers interpolate,
    booleans and strings pick the entry at int(t·(len−1))); or [{filter, value}, ...] (first match)."""
    if isinstance(setting, dict) and "value" in setting:
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond:
                raise MergekitError(f"parameter value {setting!r}: expected a number, a list of numbers or [{{filter, value}}]")
            f = cond.get("filter")
            if f is None or f == "*" or (name and f in name):
                return evaluate_setting(name, cond["value"], t)
        return None
    raise MergekitError(f"unexpected parameter value {setting!r}")


def _varies(setting) -> bool:
    return isinstance(setting, list)


# --- translation ---------------------------------------------------------------------------------
@dataclass
class Translation:
    method: str  # weightops method name
    models: list[str]
    base: str | None
    merge_method: str  # mergekit's
    dtype: str | None
    model_params: list[dict]  # raw per-model settings
    global_params: dict
    notes: list[str] = field(default_factory=list)
    per_tensor: bool = False  # some setting is a gradient or filter
    n_layers: int = 0
    seed: int = 0

    def params_for(self, name: str) -> tuple[MergeParams, list[float] | None, bool]:
        """(MergeParams for this tensor, per-model ties densities or None, ties normalize)."""
        m = _LAYER.search(name)
        t = (int(m.group(1)) / (self.n_layers - 1) if self.n_layers > 1 else 1.0) if m else 0.0

        def val(setting_name, i=None, default=None):
            src = self.model_params[i] if i is not None else {}
            s = src.get(setting_name, self.global_params.get(setting_name))
            v = evaluate_setting(name, s, t)
            return default if v is None else v

        mm = self.merge_method
        n = len(self.model_params)
        normalize = bool(val("normalize", default=DEFAULT_NORMALIZE.get(mm, False)))
        p = MergeParams(seed=self.seed)
        if mm in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs"):
            w = [val("weight", i) for i in range(n)]
            if any(x is None for x in w):
                raise MergekitError(f"{mm}: every model needs a 'weight' parameter (mergekit requires it)")
            w = [float(x) for x in w]
            if mm == "linear":
                p.weights, p.normalize = w, normalize
            else:
                if normalize and mm not in TIES_CONSENSUS:
                    s = sum(w)
                    w = [x / s for x in w] if abs(s) >= 1e-8 else w  # mergekit: divisor 1 when ~0
                p.weights = w
                p.lam = float(val("lambda", default=1.0))
        densities = None
        if mm in ("ties", "breadcrumbs"):
            ds = [float(val("density", i, 1.0)) for i in range(n)]
            if mm == "ties":
                p.trim_scope = "tensor"
                if len(set(ds)) == 1:
                    p.density = ds[0]
                else:
                    densities = ds
            else:
                gs = [float(val("gamma", i, 0.01)) for i in range(n)]
                if len(set(ds)) > 1 or len(set(gs)) > 1:
                    raise MergekitError("breadcrumbs: per-model density/gamma that differ are not supported (weightops uses one value for all models)")
                # mergekit: when gamma > 1 - density, the top band shrinks to 1 - density
                p.density, p.gamma = ds[0], min(gs[0], 1.0 - ds[0])
        if mm in ("dare_linear", "dare_ties"):
            ds = [float(val("density", i, 1.0)) for i in range(n)]
            if len(set(ds)) > 1:
                raise MergekitError(f"{mm}: per-model density (keep probability) that differs between models is not supported")
            p.drop_rate = 1.0 - ds[0]
            p.rescale = "l1" if bool(val("rescale", default=True)) else "none"
        if mm == "slerp":
            tt = val("t")
            if tt is None:
                raise MergekitError("slerp: parameter 't' is required")
            p.t = float(tt)
        return p, densities, normalize

    def equivalent_cli(self) -> str | None:
        """The `weightops merge` command giving the same tensors (None when a setting varies per tensor)."""
        if self.per_tensor:
            return None
        p, dens, normalize = self.params_for("")
        if dens is not None or (self.merge_method in TIES_CONSENSUS and not normalize):
            return None
        args = ["weightops", "merge", *self.models]
        if self.base and self.method not in ("linear", "slerp"):
            args += ["--base", self.base]
        args += ["--method", self.method]
        for k, v in p.as_dict().items():
            if k == "seed":
                if v:
                    args += ["--seed", str(v)]
                continue
            flag = {"lam": "--lambda"}.get(k, "--" + k.replace("_", "-"))
            if k == "weights":
                args += [flag, ",".join(f"{x:g}" for x in v)]
            elif k == "normalize":
                args.append("--normalize" if v else "--no-normalize")
            else:
                args += [flag, f"{v:g}" if isinstance(v, float) else str(v)]
        if self.dtype:
            args += ["--dtype", self.dtype]
        return " ".join(args)


_DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float32": "float32", "fp32": "float32", "float": "float32"}


def _model_ref(ref, what: str) -> str:
    if isinstance(ref, dict):  # mergekit's long form {model: {path: ..., lora: ...}}
        if ref.get("lora"):
            raise MergekitError(f"{what}: LoRA model references are not supported; merge the adapter first or pass the adapter to `weightops merge`")
        ref = ref.get("path") or ref.get("model")
    ref = str(ref)
    if "+" in ref and not Path(ref).exists():
        raise MergekitError(f"{what}: '{ref}' (model+lora) is not supported; merge the LoRA first")
    if not Path(ref).exists():
        raise MergekitError(f"{what}: '{ref}' is not a local checkpoint (weightops does not download; "
                            "use a local path, e.g. a snapshot_download directory)")
    return ref


def translate(config) -> Translation:
    """mergekit config -> weightops method and parameters, with notes on what was mapped or ignored."""
    cfg = load_config(config)
    unknown = sorted(set(cfg) - TOP_KEYS)
    if unknown:
        raise MergekitError(f"mergekit key(s) not supported: {', '.join(unknown)}")
    mm = cfg["merge_method"]
    if mm not in SUPPORTED:
        extra = " (a mergekit method weightops does not implement)" if mm in KNOWN_ELSEWHERE else ""
        raise MergekitError(f"merge_method '{mm}' is not supported{extra}; supported: {', '.join(SUPPORTED)}")
    notes = []
    for k in ("tokenizer_source", "tokenizer", "chat_template"):
        if cfg.get(k) is not None:
            raise MergekitError(f"'{k}' has no `weightops merge` equivalent (it is a config feature: weightops run CONFIG OUT)")
    if "models" in cfg and "slices" in cfg:
        raise MergekitError("a mergekit config has either 'models' or 'slices', not both")
    if "slices" in cfg:
        entries = _slices_as_models(cfg["slices"])
    else:
        entries = cfg.get("models") or []
    if not entries:
        raise MergekitError("the config lists no models")
    base = _model_ref(cfg["base_model"], "base_model") if cfg.get("base_model") is not None else None
    models, mparams = [], []
    for e in entries:
        if not isinstance(e, dict) or "model" not in e:
            raise MergekitError("each entry of 'models' needs a 'model:' key")
        ref = _model_ref(e["model"], "model")
        params = dict(e.get("parameters") or {})
        bad = sorted(set(params) - MODEL_PARAMS)
        if bad:
            raise MergekitError(f"per-model parameter(s) not supported: {', '.join(bad)}")
        if base is not None and Path(ref).resolve() == Path(base).resolve():
            if mm != "slerp":
                notes.append(f"{ref}: the base model listed among the models is used as the base only (as mergekit)")
                continue
        models.append(ref)
        mparams.append(params)
    gparams = dict(cfg.get("parameters") or {})
    bad = sorted(set(gparams) - GLOBAL_PARAMS)
    if bad:
        raise MergekitError(f"parameter(s) not supported: {', '.join(bad)}")
    if "int8_mask" in gparams:
        notes.append("int8_mask ignored (a mergekit memory option; it does not change results)")
    if "epsilon" in gparams:
        notes.append("epsilon ignored (DELLA only)")
    method = mm
    if mm == "slerp":
        if base is None:
            raise MergekitError("slerp needs base_model (t = 0 gives the base model)")
        others = [m for m in models if Path(m).resolve() != Path(base).resolve()]
        if len(others) != 1:
            raise MergekitError(f"slerp takes the base model and exactly one other model, got {len(others)} other(s)")
        models, mparams = [base, others[0]], [{}, {}]
        base_for_engine = None
    else:
        base_for_engine = base
        if mm in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "model_stock") and base is None:
            raise MergekitError(f"{mm} needs base_model")
    dtype = cfg.get("out_dtype") or cfg.get("dtype")
    if dtype is not None:
        if str(dtype) not in _DTYPES:
            raise MergekitError(f"dtype '{dtype}' is not supported (float32, float16, bfloat16)")
        dtype = _DTYPES[str(dtype)]
        if cfg.get("dtype") and _DTYPES.get(str(cfg["dtype"])) != "float32":
            notes.append(f"computed in float32, written as {dtype} (mergekit computes in {cfg['dtype']})")
    per_tensor = any(_varies(v) for p in mparams for v in p.values()) or any(_varies(v) for v in gparams.values())
    tr = Translation(method, models, base_for_engine, mm, dtype, mparams, gparams, notes, per_tensor)
    if mm == "dare_ties" or mm == "dare_linear":
        notes.append("DARE masks are weightops' Philox masks (deterministic from --seed), not mergekit's torch RNG draws")
    if mm == "ties":
        notes.append("trim keeps round(density·n) per tensor (mergekit: int(density·n))")
    return tr


def _slices_as_models(slices) -> list[dict]:
    """Slices amount to whole models only when there is one slice and every source spans all its layers."""
    from weightops.io.checkpoint import Checkpoint
    from weightops.layers import num_layers, read_config

    if not isinstance(slices, list) or len(slices) != 1:
        raise MergekitError("several 'slices' (layer stacking / frankenmerges) have no `weightops merge` equivalent")
    sources = slices[0].get("sources") or []
    for s in sources:
        ref = _model_ref(s["model"], "model")
        ck = Checkpoint(ref)
        n = num_layers(ck.infos, read_config(ck.path))
        ck.close()
        if list(s.get("layer_range", ())) != [0, n]:
            raise MergekitError(f"a slice of layers {s.get('layer_range')} of {ref} ({n} layers) is not a whole model")
    return [{"model": s["model"], "parameters": s.get("parameters") or {}} for s in sources]


# --- execution --------------------------------------------------------------------------------------
def _impl(method: Method, densities, normalize: bool) -> Method:
    if method.name in TIES_CONSENSUS and (densities is not None or not normalize):
        return TiesVariant(method, densities, normalize)
    return method


class TiesVariant(Method):
    """TIES/DARE-TIES as mergekit runs them beyond our defaults: one density per model, and/or
    normalize=false (the agreeing deltas are summed, not averaged)."""

    def __init__(self, inner, densities, normalize):
        self.inner, self.densities, self.normalize = inner, densities, normalize
        self.name, self.uses, self.defaults = inner.name, inner.uses, inner.defaults
        self.needs_base = True

    def validate(self, p, n_models):
        self.inner.validate(p, n_models)

    def prepare(self, job, p, model_state):
        from weightops.methods.task_arithmetic import keep_count

        state = self.inner.prepare(job, p, None)
        if self.densities is not None:
            state["lo"] = [self.inner._kth(job, i, [keep_count(d, job.numel)])[0] if d < 1 else 0.0
                           for i, d in enumerate(self.densities)]
            state["hi"] = [math.inf] * len(self.densities)
        return state

    def merge_block(self, job, p, state, start, base, models):
        import torch

        from weightops import ops

        if self.normalize:
            return self.inner.merge_block(job, p, state, start, base, models)
        # Σ w_i·d_i over the models whose kept, weighted delta agrees in sign with their sum
        # (mergekit's get_mask "sum" without the division); the keep rule is delta_merge's.
        f32 = lambda v: float(torch.tensor(float(v), dtype=torch.float32))  # noqa: E731  (as ops rounds knobs)
        b = base.float().reshape(-1)
        n = b.numel()
        w = p.weights if p.weights is not None else [1.0] * len(models)
        ds = []
        for i, x in enumerate(models):
            d = x.float().reshape(-1) - b
            a = d.abs()
            keep = torch.ones(n, dtype=torch.bool)
            if state["lo"] is not None:
                keep &= ~(a < f32(state["lo"][i]))
            if state["hi"] is not None and state["hi"][i] != math.inf:
                keep &= a < f32(state["hi"][i])
            if state["thr"] > 0:
                keep &= ops.philox_keep_mask(state["keys"][i], start, n, state["thr"])
            ds.append(f32(w[i]) * torch.where(keep, d * f32(state["rescales"][i]), torch.zeros_like(d)))
        s = torch.zeros_like(b)
        for d in ds:
            s = s + d
        pos = s >= 0
        m = torch.zeros_like(b)
        for d in ds:
            m = torch.where(torch.where(pos, d > 0, d < 0), m + d, m)
        return (b + f32(p.lam) * m).reshape(base.shape)


# --- the planner: every mergekit config as one streaming pass ------------------------------------
# Parameter scopes, as mergekit's ParameterSpec: shared by the tensor, per input, per non-base input.
SHARED, INPUT, NON_BASE = "shared", "input", "non_base"
REQUIRED = object()


@dataclass(frozen=True)
class MethodSpec:
    """mergekit 0.1.5's contract of a method: its parameters (scope, default) and inputs."""

    params: dict
    base: str = "required"  # required | optional | ignored (the base, if listed, is an ordinary input)
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None


def _gta(normalize: bool, rescale: bool, **extra) -> MethodSpec:
    return MethodSpec({"int8_mask": (SHARED, False), "normalize": (SHARED, normalize), "rescale": (SHARED, rescale),
                       "lambda": (SHARED, 1.0), "weight": (NON_BASE, REQUIRED), "density": (NON_BASE, 1.0),
                       **{k: (NON_BASE, v) for k, v in extra.items()}})


# mergekit/merge_methods/registry.py (0.1.5): every method, its parameters and their defaults.
SPECS: dict[str, MethodSpec] = {
    "linear": MethodSpec({"weight": (INPUT, REQUIRED), "normalize": (SHARED, True)}, base="ignored"),
    "task_arithmetic": _gta(False, False),
    "ties": _gta(True, False),
    "dare_ties": _gta(False, True),
    "dare_linear": _gta(False, True),
    "breadcrumbs": _gta(False, False, gamma=0.01),
    "breadcrumbs_ties": _gta(False, False, gamma=0.01),
    "della": _gta(True, True, epsilon=0.15),
    "della_linear": _gta(False, True, epsilon=0.15),
    "slerp": MethodSpec({"t": (SHARED, REQUIRED)}, min_inputs=2, max_inputs=2),
    "model_stock": MethodSpec({"filter_wise": (SHARED, False)}, min_inputs=3),
    "nuslerp": MethodSpec({"weight": (NON_BASE, REQUIRED), "nuslerp_row_wise": (SHARED, False),
                           "nuslerp_flatten": (SHARED, True)}, base="optional", min_non_base=2, max_non_base=2),
    "multislerp": MethodSpec({"weight": (NON_BASE, REQUIRED), "normalize_weights": (SHARED, True),
                              "eps": (SHARED, 1e-8)}, base="optional", min_non_base=1),
    "karcher": MethodSpec({"max_iter": (SHARED, 10), "tol": (SHARED, 1e-5)}, base="ignored"),
    "nearswap": MethodSpec({"t": (SHARED, REQUIRED)}, min_inputs=2, max_inputs=2),
    "arcee_fusion": MethodSpec({}, min_inputs=2, max_inputs=2),
    "passthrough": MethodSpec({"scale": (INPUT, None)}, base="ignored", max_inputs=1),
    "sce": MethodSpec({"int8_mask": (SHARED, False), "select_topk": (SHARED, 1.0)}),
    "ram": MethodSpec({"epsilon": (SHARED, 1e-5)}),
    "ramplus_tl": MethodSpec({"r": (SHARED, 0.1), "alpha": (SHARED, 0.2), "epsilon": (SHARED, 1e-5)}),
}

# mergekit parameter -> weightops MergeParams field, per method (None: the parameter needs no field).
# The one place where mergekit's names and meanings meet ours: the CLI flags are these fields, so
# `weightops merge --method M --FIELD v` and a mergekit config with `PARAM: v` compute the same thing.
# `density` is the one whose meaning depends on the method (docs/merging.md, "mergekit parameters"):
#   ties, breadcrumbs*, della*: fraction of |δ| KEPT (magnitude trim / DELLA's mean keep probability);
#   dare_*: the KEEP probability of the random drop, i.e. our --drop-rate is 1 − density.
def _l1_or_none(r) -> str:
    return "l1" if r else "none"


PARAMETER_MAP: dict[str, dict[str, tuple[str | None, Any]]] = {
    "linear": {"weight": ("weights", None), "normalize": ("normalize", None)},
    "task_arithmetic": {"weight": ("weights", None), "lambda": ("lam", None)},
    "ties": {"weight": ("weights", None), "lambda": ("lam", None), "density": ("density", None)},
    "dare_linear": {"weight": ("weights", None), "lambda": ("lam", None),
                    "density": ("drop_rate", lambda d: 1.0 - d), "rescale": ("rescale", _l1_or_none)},
    "dare_ties": {"weight": ("weights", None), "lambda": ("lam", None),
                  "density": ("drop_rate", lambda d: 1.0 - d), "rescale": ("rescale", _l1_or_none)},
    "breadcrumbs": {"weight": ("weights", None), "lambda": ("lam", None), "density": ("density", None),
                    "gamma": ("gamma", None)},
    "breadcrumbs_ties": {"weight": ("weights", None), "lambda": ("lam", None), "density": ("density", None),
                         "gamma": ("gamma", None), "normalize": ("normalize", None), "rescale": ("rescale", _l1_or_none)},
    "della": {"weight": ("weights", None), "lambda": ("lam", None), "density": ("density", None),
              "epsilon": ("epsilon", None), "normalize": ("normalize", None), "rescale": ("rescale", _l1_or_none)},
    "della_linear": {"weight": ("weights", None), "lambda": ("lam", None), "density": ("density", None),
                     "epsilon": ("epsilon", None), "normalize": ("normalize", None), "rescale": ("rescale", _l1_or_none)},
    "slerp": {"t": ("t", None)},
    "model_stock": {"filter_wise": ("filter_wise", None)},
    "nuslerp": {"weight": ("weights", None), "nuslerp_row_wise": ("nuslerp_row_wise", None),
                "nuslerp_flatten": ("nuslerp_flatten", None)},
    "multislerp": {"weight": ("weights", None), "normalize_weights": ("normalize", None), "eps": ("eps", None)},
    "karcher": {"max_iter": ("max_iter", None), "tol": ("tol", None)},
    "nearswap": {"t": ("t", None)},
    "arcee_fusion": {},
    "passthrough": {"scale": ("scale", None)},
    "sce": {"select_topk": ("select_topk", None)},
    "ram": {"epsilon": ("epsilon", None)},
    "ramplus_tl": {"r": ("r", None), "alpha": ("alpha", None), "epsilon": ("epsilon", None)},
}


def to_weightops(method: str, name: str, value):
    """(MergeParams field, value) of mergekit parameter `name` of `method` (field None: nothing to set)."""
    field_, conv = PARAMETER_MAP.get(method, {}).get(name, (None, None))
    return field_, (conv(value) if conv is not None and value is not None else value)


def parse_ref(ref, what: str) -> tuple[str, str | None]:
    """mergekit's ModelReference: 'path[@rev][+lora[@rev]]' or {model: ..., lora: ...} -> (model, lora)."""
    def path(x):
        if isinstance(x, dict):
            p, rev = x.get("path"), x.get("revision")
            if not isinstance(p, str):
                raise MergekitError(f"{what}: model reference {x!r} has no 'path'")
            return p + (f"@{rev}" if rev else "")
        return str(x)
    if isinstance(ref, dict):
        if "model" not in ref and "path" in ref:
            return path(ref), None
        if "model" not in ref:
            raise MergekitError(f"{what}: model reference {ref!r} has no 'model'")
        return path(ref["model"]), (path(ref["lora"]) if ref.get("lora") else None)
    if not isinstance(ref, str) or not ref:
        raise MergekitError(f"{what}: expected a model reference (a path or hub id), got {ref!r}")
    if ref.count("+") > 1:
        raise MergekitError(f"{what}: cannot parse '{ref}' (model+lora takes one '+')")
    model, _, lora = ref.partition("+")
    if Path(ref).exists():  # a local directory whose name contains '+'
        return ref, None
    return model, (lora or None)


def ref_key(ref: tuple[str, str | None]) -> str:
    return ref[0] + (f"+{ref[1]}" if ref[1] else "")


class _Models:
    """Opens each referenced model once: a checkpoint (local or hub id) or a LoRA adapter on one."""

    def __init__(self):
        self.sources: dict[str, Any] = {}
        self.refs: dict[str, tuple[str, str | None]] = {}
        self.configs: dict[str, dict] = {}

    def open(self, ref: tuple[str, str | None]):
        from weightops.io.checkpoint import Checkpoint, open_source

        key = ref_key(ref)
        if key not in self.sources:
            model, lora = ref
            base = Checkpoint(model)
            self.sources[key] = open_source(lora, base) if lora else base
            if lora and self.sources[key].kind != "lora":
                raise MergekitError(f"'{key}': {lora} is not a LoRA adapter directory")
            self.refs[key] = ref
            from weightops.layers import read_config

            self.configs[key] = read_config(base.path)
        return self.sources[key]

    def close(self):
        for s in self.sources.values():
            s.close()
            b = getattr(s, "base", None)
            if b is not None:
                b.close()


@dataclass
class Input:
    model: str  # ref key
    name: str  # tensor name in that model
    params: dict = field(default_factory=dict)  # resolved per-input parameters


@dataclass
class OutTensor:
    name: str
    shape: tuple
    dtype: Any
    inputs: list[Input]
    base: int | None  # index into inputs of the base model (None: no base among the inputs)
    shared: dict = field(default_factory=dict)
    t: float = 0.0
    binding: Any = None  # (Method, MergeParams, base input or None, model inputs)
    reader: dict = field(default_factory=dict)  # input index -> a reader replacing model.read (vocabulary alignment)


@dataclass
class Plan:
    merge_method: str
    tensors: list[OutTensor]
    models: _Models
    base_key: str | None
    n_layers: int
    template_key: str
    dtype: str | None
    notes: list[str]
    config: dict
    seed: int = 0
    tokenizer: Any = None  # weightops.tokenizer_merge.TokenizerPlan


def _settings(slice_def: dict | None, model_key: str | None, cfg: dict, srcs_keys) -> list:
    """mergekit's ConfigReader.parameter_sources: input's own, the slice's, then the config's."""
    out = []
    if slice_def is not None:
        if model_key is not None:
            for src, key in zip(slice_def.get("sources") or [], srcs_keys):
                if key == model_key:
                    out.append(src.get("parameters"))
        out.append(slice_def.get("parameters"))
    out.append(cfg.get("parameters"))
    return out


def _resolve(spec: MethodSpec, mm: str, pname: str, settings, tensor_name: str, t: float, where: str):
    scope, default = spec.params[pname]
    for sc in settings:
        if sc is not None and pname in sc:
            v = evaluate_setting(tensor_name, sc[pname], t)
            if v is not None:
                return v
    if default is REQUIRED:
        raise MergekitError(f"{mm}: missing required parameter '{pname}' for {where}")
    return default


def _check_known(spec: MethodSpec, mm: str, settings_list) -> None:
    for sc in settings_list:
        for k in (sc or {}):
            if k not in spec.params:
                known = ", ".join(spec.params) or "none"
                raise MergekitError(f"{mm}: unknown parameter '{k}' (mergekit's {mm} takes: {known})")


def _normalize_slices(cfg: dict, mm: str, spec: MethodSpec, models: _Models, base_ref) -> list[dict]:
    """models: -> one slice over every layer (the base appended when not listed), as mergekit's normalize_config."""
    from weightops.layers import num_layers

    if "modules" in cfg:
        raise MergekitError("'modules:' (multi-module architectures) is not supported; use 'models:' or 'slices:'")
    have = [k for k in ("models", "slices") if cfg.get(k)]
    if len(have) != 1:
        raise MergekitError("a mergekit config needs exactly one of 'models' or 'slices'")
    if have[0] == "slices":
        slices = cfg["slices"]
        if not isinstance(slices, list) or not slices:
            raise MergekitError("'slices' must be a non-empty list")
        out = []
        for i, s in enumerate(slices):
            if not isinstance(s, dict) or not isinstance(s.get("sources"), list) or not s["sources"]:
                raise MergekitError(f"slices[{i}] needs a non-empty 'sources' list")
            bad = sorted(set(s) - {"sources", "base_model", "parameters", "residual_weight"})
            if bad or s.get("residual_weight") is not None:
                raise MergekitError(f"slices[{i}]: key(s) not supported: {', '.join(bad or ['residual_weight'])}")
            srcs = []
            for j, src in enumerate(s["sources"]):
                if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                    raise MergekitError(f"slices[{i}].sources[{j}] needs 'model' and 'layer_range'")
                lr = src["layer_range"]
                if (not isinstance(lr, (list, tuple)) or len(lr) != 2 or not all(isinstance(x, int) for x in lr)
                        or lr[0] < 0 or lr[1] < lr[0]):
                    raise MergekitError(f"slices[{i}].sources[{j}]: layer_range must be [start, end) with 0 <= start <= end, got {lr!r}")
                bad = sorted(set(src) - {"model", "layer_range", "parameters"})
                if bad:
                    raise MergekitError(f"slices[{i}].sources[{j}]: key(s) not supported: {', '.join(bad)}")
                srcs.append({"ref": parse_ref(src["model"], f"slices[{i}].sources[{j}]"), "layer_range": tuple(lr),
                             "parameters": src.get("parameters")})
            sb = parse_ref(s["base_model"], f"slices[{i}].base_model") if s.get("base_model") else None
            out.append({"sources": srcs, "base": sb, "parameters": s.get("parameters")})
        return out
    srcs, base_in = [], False
    for j, e in enumerate(cfg["models"]):
        if not isinstance(e, dict) or "model" not in e:
            raise MergekitError("each entry of 'models' needs a 'model:' key")
        bad = sorted(set(e) - {"model", "parameters"})
        if bad:
            raise MergekitError(f"models[{j}]: key(s) not supported: {', '.join(bad)}")
        ref = parse_ref(e["model"], f"models[{j}]")
        src = models.open(ref)
        key = ref_key(ref)
        srcs.append({"ref": ref, "layer_range": (0, num_layers(src.infos, models.configs[key])), "parameters": e.get("parameters")})
        base_in |= base_ref is not None and ref_key(ref) == ref_key(base_ref)
    if base_ref is not None and not base_in:
        src = models.open(base_ref)
        srcs.append({"ref": base_ref, "layer_range": (0, num_layers(src.infos, models.configs[ref_key(base_ref)])),
                     "parameters": None})
    return [{"sources": srcs, "base": None, "parameters": None}]


def _check_contract(spec: MethodSpec, mm: str, keys: list[str], base_key: str | None, where: str) -> None:
    if len(set(keys)) != len(keys):
        raise MergekitError(f"{mm}: {where} lists the same model twice")
    has_base = base_key is not None and base_key in keys and spec.base != "ignored"
    if spec.base == "required" and not has_base:
        raise MergekitError(f"{mm} needs base_model among the inputs of {where}")
    n = len(keys)
    nb = n - int(has_base)
    if n < spec.min_inputs or (spec.max_inputs is not None and n > spec.max_inputs):
        want = f"exactly {spec.min_inputs}" if spec.min_inputs == spec.max_inputs else (
            f"at most {spec.max_inputs}" if spec.max_inputs is not None and n > spec.max_inputs else f"at least {spec.min_inputs}")
        raise MergekitError(f"{mm} takes {want} input model(s) (base included), {where} has {n}")
    if spec.min_non_base is not None and nb < spec.min_non_base or spec.max_non_base is not None and nb > spec.max_non_base:
        lo, hi = spec.min_non_base or 0, spec.max_non_base
        want = f"exactly {lo}" if lo == hi else f"at least {lo}"
        raise MergekitError(f"{mm} takes {want} model(s) besides the base, {where} has {nb}")


def plan_config(config, *, seed: int = 0) -> Plan:
    """Read a mergekit config and plan every output tensor: its inputs (model, tensor name), base, and
    per-tensor parameters, with mergekit's slice, layer and precedence rules. Nothing is computed."""
    from weightops import layers as L

    cfg = load_config(config)
    unknown = sorted(set(cfg) - TOP_KEYS)
    if unknown:
        raise MergekitError(f"mergekit key(s) not supported: {', '.join(unknown)}")
    mm = cfg["merge_method"]
    if mm not in SPECS:
        raise MergekitError(f"merge_method '{mm}' is not a mergekit 0.1.5 method; methods: {', '.join(sorted(SPECS))}")
    spec = SPECS[mm]
    notes: list[str] = []
    models = _Models()
    tok = None
    try:
        base_ref = parse_ref(cfg["base_model"], "base_model") if cfg.get("base_model") is not None else None
        if base_ref is not None:
            models.open(base_ref)
        slices = _normalize_slices(cfg, mm, spec, models, base_ref)
        gsettings = [cfg.get("parameters")] + [s.get("parameters") for s in slices] + \
            [src.get("parameters") for s in slices for src in s["sources"]]
        _check_known(spec, mm, gsettings)
        if (cfg.get("parameters") or {}).get("int8_mask") or any((x or {}).get("int8_mask") for x in gsettings):
            notes.append("int8_mask ignored (a mergekit memory option; it does not change results)")
        for s in slices:
            for src in s["sources"]:
                models.open(src["ref"])
        base_key = ref_key(base_ref) if base_ref is not None else None
        from weightops import tokenizer_merge

        order = list(dict.fromkeys(([base_key] if base_key else []) + [ref_key(src["ref"]) for s in slices
                                                                         for src in s["sources"]]))
        tok = tokenizer_merge.plan_tokenizer(cfg, models, base_key, order, notes)
        if tok is None:
            note = tokenizer_merge.same_vocabulary_note(models, order)
            if note:
                notes.append(note)
        tensors: list[OutTensor] = []
        first = slices[0]["sources"]
        template_key = ref_key(first[0]["ref"])

        def add(out_name, ins: list[tuple[str, str]], slice_def, t):
            keys = [k for k, _ in ins]
            sb = ref_key(slice_def["base"]) if slice_def and slice_def.get("base") else base_key
            bpos = keys.index(sb) if sb is not None and sb in keys and spec.base != "ignored" else None
            srcs_keys = [ref_key(x["ref"]) for x in slice_def["sources"]] if slice_def else []
            raw_slice = {"sources": [{"parameters": x["parameters"]} for x in slice_def["sources"]],
                         "parameters": slice_def.get("parameters")} if slice_def else None
            shared = {p: _resolve(spec, mm, p, _settings(raw_slice, None, cfg, srcs_keys), out_name, t, out_name)
                      for p, (sc, _) in spec.params.items() if sc == SHARED}
            inputs = []
            for i, (k, nm) in enumerate(ins):
                per = {p: _resolve(spec, mm, p, _settings(raw_slice, k, cfg, srcs_keys), nm, t, f"{k}.{nm}")
                       for p, (sc, _) in spec.params.items() if sc == INPUT or (sc == NON_BASE and i != bpos)}
                inputs.append(Input(k, nm, per))
            info = models.sources[ins[0][0]].infos[ins[0][1]]
            if tok is not None and tok.aligned and L.is_vocabulary(out_name):
                rows = tok.rows(ins, models.sources, sb, out_name)
                tensors.append(OutTensor(out_name, rows.shape, info.dtype, inputs, bpos, shared, t,
                                         reader={i: rows.reader(i) for i in range(len(ins))}))
                return
            for k, nm in ins[1:]:
                other = models.sources[k].infos[nm]
                if tuple(other.shape) != tuple(info.shape):
                    hint = ""
                    if L.is_vocabulary(out_name):
                        hint = (" (the vocabularies differ: set `tokenizer_source: union` (every model's tokens), `base` "
                                "(the base's vocabulary) or a model's path in the config to align the rows token by token)")
                    raise MergekitError(f"'{out_name}': {nm} is {list(other.shape)} in {k} but {list(info.shape)} in "
                                        f"{ins[0][0]}{hint}")
            tensors.append(OutTensor(out_name, tuple(info.shape), info.dtype, inputs, bpos, shared, t))

        def need(key: str, name: str, what: str):
            if name not in models.sources[key].infos:
                raise MergekitError(f"{what}: model {key} has no tensor '{name}'")

        def pre_post(slice_def, pre: bool):
            srcs = slice_def["sources"]
            tmpl = models.sources[ref_key(srcs[0]["ref"])]
            for name in tmpl.infos:
                if L.layer_of(name) is not None or L.is_embedding(name) != pre:
                    continue
                ins = []
                for src in srcs:
                    k = ref_key(src["ref"])
                    nm = _tied(models.sources[k], name)
                    if nm is None:
                        raise MergekitError(f"'{name}': model {k} has no such tensor")
                    ins.append((k, nm))
                add(name, ins, slice_def, 0.0)

        pre_post(slices[0], True)
        out_layer = 0
        for si, s in enumerate(slices):
            srcs = s["sources"]
            lens = {src["layer_range"][1] - src["layer_range"][0] for src in srcs}
            if len(lens) != 1:
                raise MergekitError(f"slices[{si}]: every source must span the same number of layers, got "
                                    + ", ".join(f"{ref_key(x['ref'])} {list(x['layer_range'])}" for x in srcs))
            keys = [ref_key(x["ref"]) for x in srcs]
            sb = ref_key(s["base"]) if s.get("base") else base_key
            _check_contract(spec, mm, keys, sb, f"slices[{si}]" if "slices" in cfg else "the config")
            n = lens.pop()
            for src in srcs:
                k = ref_key(src["ref"])
                have = L.num_layers(models.sources[k].infos, models.configs[k])
                if src["layer_range"][1] > have:
                    raise MergekitError(f"slices[{si}]: layer_range {list(src['layer_range'])} is past the {have} layers of {k}")
            for off in range(n):
                t = off / (n - 1) if n > 1 else 1.0
                layer_names = {k: [nm for nm in models.sources[k].infos
                                   if L.layer_of(nm) == src["layer_range"][0] + off]
                               for k, src in zip(keys, srcs)}
                first_k = keys[0]
                for nm in layer_names[first_k]:
                    ins = [(first_k, nm)]
                    for k, src in zip(keys[1:], srcs[1:]):
                        other = L.renumber(nm, src["layer_range"][0] + off)
                        need(k, other, f"slices[{si}] layer {src['layer_range'][0] + off}")
                        ins.append((k, other))
                    add(L.renumber(nm, out_layer), ins, s, t)
                out_layer += 1
        pre_post(slices[-1], False)
        n_out = out_layer
        plan = Plan(mm, tensors, models, base_key, n_out, template_key, _dtype(cfg, notes), notes, cfg, seed, tok)
        for tp in tensors:
            tp.binding = bind(plan, tp)
        return plan
    except BaseException:
        models.close()
        if tok is not None:
            tok.cleanup()
        raise


def _tied(src, name: str) -> str | None:
    """The tensor `name` of a model, or for a head tied to the embeddings (no lm_head.weight) the embeddings."""
    if name in src.infos:
        return name
    if name == "lm_head.weight":
        for cand in ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed.weight"):
            if cand in src.infos:
                return cand
    return None


def _dtype(cfg: dict, notes: list[str]) -> str | None:
    dtype = cfg.get("out_dtype") or cfg.get("dtype")
    if dtype is None:
        return None
    if str(dtype) not in _DTYPES:
        raise MergekitError(f"dtype '{dtype}' is not supported (float32, float16, bfloat16)")
    if cfg.get("dtype") and _DTYPES.get(str(cfg["dtype"])) != "float32":
        notes.append(f"computed in float32, written as {_DTYPES[str(dtype)]} (mergekit computes in {cfg['dtype']})")
    return _DTYPES[str(dtype)]


def _same(values: list, what: str, mm: str):
    if len(set(values)) > 1:
        raise MergekitError(f"{mm}: per-model {what} that differ between models is not supported ({values})")
    return values[0]


def bind(plan: Plan, tp: OutTensor):
    """(our Method, its MergeParams, base input index or None, model input indices) for one output tensor."""
    from weightops.methods import MergeParams, get_method

    mm, sh = plan.merge_method, tp.shared
    n = len(tp.inputs)
    nb = [i for i in range(n) if i != tp.base]
    per = lambda key, idx=nb: [tp.inputs[i].params[key] for i in idx]  # noqa: E731
    p = MergeParams()
    base, ins = tp.base, nb
    from weightops.methods.base import REGISTRY

    if mm not in REGISTRY:
        raise MergekitError(f"merge_method '{mm}' is not implemented in weightops yet")
    method = get_method(mm)

    def put(name, value):
        f, v = to_weightops(mm, name, value)
        if f is not None:
            setattr(p, f, v)

    if mm == "linear":
        base, ins = None, list(range(n))
        put("weight", [float(x) for x in per("weight", ins)])
        put("normalize", bool(sh["normalize"]))
    elif mm in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs"):
        w = [float(x) for x in per("weight")]
        normalize = bool(sh["normalize"])
        if normalize and mm not in TIES_CONSENSUS:
            s = sum(w)
            w = [x / s for x in w] if abs(s) >= 1e-8 else w  # mergekit: divisor 1 when ~0
        put("weight", w)
        put("lambda", float(sh["lambda"]))
        densities = None
        if mm in ("ties", "breadcrumbs") and sh["rescale"]:
            raise MergekitError(f"{mm}: rescale: true (L1 rescale after a magnitude trim) is not supported")
        if mm == "ties":
            p.trim_scope = "tensor"
            ds = [float(x) for x in per("density")]
            if len(set(ds)) == 1:
                put("density", ds[0])
            else:
                densities = ds
        elif mm == "breadcrumbs":
            d = float(_same(per("density"), "density", mm))
            g = float(_same(per("gamma"), "gamma", mm))
            put("density", d)
            put("gamma", min(g, 1.0 - d))  # mergekit shrinks the top band to keep `density`
        elif mm in ("dare_linear", "dare_ties"):
            put("density", float(_same(per("density"), "density (keep probability)", mm)))
            put("rescale", bool(sh["rescale"]))
        method = _impl(method, densities, normalize)
    elif mm == "slerp":
        base_i = tp.base
        other = [i for i in range(n) if i != base_i]
        base, ins = None, [base_i] + other
        put("t", float(sh["t"]))
    elif mm == "passthrough":
        base, ins = None, [0]
        sc = tp.inputs[0].params.get("scale")
        put("scale", None if sc is None else [float(sc)])
    else:
        for name, (scope, _) in SPECS[mm].params.items():
            if name == "int8_mask":
                continue
            if scope == SHARED:
                put(name, sh[name])
            else:
                idx = list(range(n)) if scope == INPUT else nb
                vals = per(name, idx)
                put(name, vals)
        if SPECS[mm].base == "ignored":
            base, ins = None, list(range(n))
        elif SPECS[mm].base == "optional" and tp.base is None:
            base, ins = None, nb
    p.seed = plan.seed
    return method, method.resolve(p, len(ins)), base, ins


# --- execution: the plan as sources and one method for the streaming engine -----------------------
class _OutInfo:
    """An output tensor's layout as the engine sees it (the TensorInfo fields it reads)."""

    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        from weightops.io.safetensors_file import FLOAT_DTYPES

        return self.dtype in FLOAT_DTYPES


class _Slot:
    """Input slot k of every output tensor as one engine source: slot 0 is the base (or, for a copied
    non-float tensor, its first input), slot k ≥ 1 the k-th model input of the tensor's method. A slot a
    tensor does not use reads as an empty block, so the engine's one loop serves tensors with different
    numbers of inputs (slices) at no I/O cost."""

    kind = "mergekit"

    def __init__(self, plan: Plan, infos: dict, k: int, path: str, sidecars=()):
        self.plan, self.infos, self.k, self.path = plan, infos, k, Path(path)
        self._by_name = {tp.name: tp for tp in plan.tensors}
        self._sidecars = list(sidecars)

    def _route(self, name):
        tp = self._by_name[name]
        _, _, base, ins = tp.binding
        if self.k == 0:  # the base; without one the first input (a zero-copy view, read again only by a copy)
            i = base if base is not None else ins[0]
        else:
            i = ins[self.k - 1] if self.k - 1 < len(ins) else None
        return tp, i

    def read(self, name, start, stop):
        import torch

        tp, i = self._route(name)
        if i is None:
            return torch.empty(0, dtype=self.infos[name].dtype)
        r = tp.reader.get(i)
        if r is not None:
            return r(start, stop)
        inp = tp.inputs[i]
        return self.plan.models.sources[inp.model].read(inp.name, start, stop)

    def release(self, name, start, stop):
        tp, i = self._route(name)
        if i is not None and i not in tp.reader:
            inp = tp.inputs[i]
            self.plan.models.sources[inp.model].release(inp.name, start, stop)

    def file_hashes(self):
        return []

    def sidecar_files(self):
        return self._sidecars

    def manifest_inputs(self) -> list[dict]:
        from weightops import hub

        out = []
        for key, src in self.plan.models.sources.items():
            model, lora = self.plan.models.refs[key]
            role = "base" if key == self.plan.base_key else "model"
            base_ck = getattr(src, "base", None) if lora else None
            files = src.file_hashes() + (base_ck.file_hashes() if base_ck is not None else [])
            out.append({"role": role, "ref": key, "path": str((base_ck or src).path), "kind": src.kind,
                        **hub.describe((base_ck or src).path),
                        **({"lora": {"path": str(src.path), **hub.describe(src.path)}} if lora else {}),
                        "files": files})
        return out

    def close(self):
        if self.k == 0:
            self.plan.models.close()


class Routed(Method):
    """Each output tensor merged by its own (method, parameters) over its own inputs (see `bind`)."""

    needs_base = False

    def __init__(self, plan: Plan):
        self.plan = plan
        self.name = plan.merge_method
        self._by_name = {tp.name: tp for tp in plan.tensors}

    def prepare(self, job, p, model_state):
        from weightops.methods.base import TensorJob

        tp = self._by_name[job.name]
        impl, q, base, ins = tp.binding
        slots = list(range(len(ins)))

        def read_block(sub, start, stop, which=None):
            b, xs = job.read_block(job, start, stop, slots if which is None else [slots[i] for i in which])
            return (b if base is not None else None), xs

        sub = TensorJob(job.name, job.shape, job.out_dtype, job.base if base is not None else None,
                        job.models[: len(ins)], job.block_size, read_block)
        return impl, q, sub, impl.prepare(sub, q, None), len(ins), base is not None

    def merge_block(self, job, p, state, start, base, models):
        impl, q, sub, st, n, has_base = state
        return impl.merge_block(sub, q, st, start, base if has_base else None, models[:n])


def mergekit_merge(config, out, *, seed: int = 0, dtype: str | None = None, force: bool = False, quiet: bool = False,
                   command=None, **engine_kw):
    """Run a mergekit config (dict or YAML file) into `out` with the streaming engine."""
    import yaml

    from weightops.engine import run_streaming
    from weightops.methods import MergeParams

    plan = plan_config(config, seed=seed)
    try:
        infos = {tp.name: _OutInfo(tp.name, tp.shape, tp.dtype) for tp in plan.tensors}
        n_slots = max(len(tp.binding[3]) for tp in plan.tensors) if plan.tensors else 0
        sidecars, extra_json = _sidecars(plan)
        label = str(config) if not isinstance(config, dict) else "<mergekit config>"
        slots = [_Slot(plan, infos, k, label, sidecars if k == 0 else ()) for k in range(n_slots + 1)]
        text = (Path(str(config)).read_text() if not isinstance(config, dict) and Path(str(config)).is_file()
                else yaml.safe_dump(plan.config, sort_keys=False))
        mk = {"merge_method": plan.merge_method, "notes": plan.notes, "config_yaml": text,
              "output_layers": plan.n_layers}
        try:
            mk["equivalent_cli"] = translate(config).equivalent_cli()
        except WeightopsError:
            mk["equivalent_cli"] = None
    except BaseException:
        plan.models.close()
        if plan.tokenizer is not None:
            plan.tokenizer.cleanup()
        raise
    try:
        res = run_streaming(Routed(plan), MergeParams(seed=seed), slots[0], slots[1:], out=out,
                            dtype=dtype or plan.dtype, force=force, quiet=quiet, command=command, extra_json=extra_json,
                            manifest_extra={"method": plan.merge_method, "mergekit": mk, "seed": seed}, **engine_kw)
    finally:
        if plan.tokenizer is not None:
            plan.tokenizer.cleanup()
    res.warnings[:0] = plan.notes
    return res


def _sidecars(plan: Plan) -> tuple[list, dict]:
    """Files next to the weights: the base's (else the first model's) config and tokenizer, with config.json's
    layer count set to the output's; a rebuilt tokenizer (weightops.tokenizer_merge) replaces the tokenizer
    files, and with an aligned vocabulary config.json's vocab_size is the output's rows."""
    from weightops import layers as L
    from weightops.tokenizer_merge import TOKENIZER_FILES

    key = plan.base_key or plan.template_key
    src = plan.models.sources[key]
    ck = getattr(src, "base", None) or src
    tok = plan.tokenizer
    files = [f for f in ck.sidecar_files() if f.name != "config.json" and (tok is None or f.name not in TOKENIZER_FILES)]
    if tok is not None:
        files += tok.files()
    cfg = dict(plan.models.configs.get(key) or {})
    extra = {}
    if cfg:
        k = L.config_layer_key(cfg)
        if k is not None and cfg[k] != plan.n_layers:
            cfg[k] = plan.n_layers
            plan.notes.append(f"config.json {k} set to {plan.n_layers} (the output's layers)")
        if tok is not None and tok.aligned and cfg.get("vocab_size") != tok.size:
            cfg["vocab_size"] = tok.size
            plan.notes.append(f"config.json vocab_size set to {tok.size} (the output's vocabulary)")
        extra["config.json"] = cfg
    return files, extra
