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
  are not local directories, `tokenizer`/`tokenizer_source` other than the
  base's, `chat_template`, unknown parameters.
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
TOP_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
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
    """mergekit's config.evaluate_setting: scalar, gradient over t ∈ [0, 1], or [{filter, value}, ...]."""
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return setting
    if isinstance(setting, list):
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            if not setting:
                return None
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
        if k in cfg and cfg[k] not in (None, "base"):
            raise MergekitError(f"'{k}: {cfg[k]}' is not supported (weightops copies the base's tokenizer files)")
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
    """Slices are accepted only when they amount to whole models (one slice, same layer range for every source)."""
    if not isinstance(slices, list) or len(slices) != 1:
        raise MergekitError("multiple 'slices' (layer stacking / frankenmerges) are not supported")
    sources = slices[0].get("sources") or []
    ranges = {tuple(s.get("layer_range", ())) for s in sources}
    if len(ranges) != 1:
        raise MergekitError("slices whose sources use different layer ranges are not supported")
    return [{"model": s["model"], "parameters": s.get("parameters") or {}} for s in sources]


# --- execution --------------------------------------------------------------------------------------
class PerTensorParams(Method):
    """Wrap a method so every tensor gets its own parameters (mergekit gradients and filters)."""

    def __init__(self, inner: Method, tr: Translation):
        self.inner, self.tr = inner, tr
        self.name, self.summary = inner.name, inner.summary
        self.needs_base = inner.needs_base

    def prepare(self, job, p, model_state):
        q, dens, normalize = self.tr.params_for(job.name)
        impl = _impl(self.inner, dens, normalize)
        q = impl.resolve(q, len(job.models))
        return impl, q, impl.prepare(job, q, None)

    def merge_block(self, job, p, state, start, base, models):
        impl, q, st = state
        return impl.merge_block(job, q, st, start, base, models)


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


def mergekit_merge(config, out, *, seed: int = 0, dtype: str | None = None, force: bool = False, quiet: bool = False,
                   command=None, **engine_kw):
    """Run a mergekit config (dict or YAML file) into `out` with the streaming engine."""
    from weightops.engine import run_streaming
    from weightops.io.checkpoint import Checkpoint
    from weightops.methods import get_method

    tr = translate(config)
    m = get_method(tr.method)
    base_src = Checkpoint(tr.base) if tr.base is not None else None
    sources = [Checkpoint(x) for x in tr.models]
    names = (base_src or sources[0]).infos
    tr.n_layers = 1 + max((int(mm.group(1)) for n in names if (mm := _LAYER.search(n))), default=-1)
    tr.seed = seed
    p, dens, normalize = tr.params_for("")
    if tr.per_tensor or dens is not None or (tr.merge_method in TIES_CONSENSUS and not normalize):
        method, params = PerTensorParams(m, tr), MergeParams(seed=seed)
        for name in names:  # validate every tensor's parameters now, so a bad config fails before writing
            q, d, nz = tr.params_for(name)
            _impl(m, d, nz).resolve(q, len(sources))
    else:
        method, params = m, m.resolve(p, len(sources))
    return run_streaming(method, params, base_src, sources, out=out, dtype=dtype or tr.dtype, force=force, quiet=quiet,
                         command=command, manifest_extra={"method": tr.method, "mergekit": {
                             "merge_method": tr.merge_method, "notes": tr.notes,
                             "equivalent_cli": tr.equivalent_cli()}, "seed": seed}, **engine_kw)
