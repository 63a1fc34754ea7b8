"""The streaming merge: read → plan → compute blocks → write.

1. Open the base and the models (checkpoints or LoRA adapters on the base).
2. Plan: align every tensor by name; each output tensor is either merged
   (float, present everywhere, not excluded) or copied from the template
   (the base, else the first model): integer/bool buffers (with a warning),
   --exclude matches and, with --allow-missing, tensors some model lacks.
   Block-scaled FP8 weights are float tensors (read in fp32, written as bf16 or
   re-quantized); FP8 of any other convention, and checkpoints quantized by
   other methods, are refused by name.
3. Compute: for each tensor in file order, the method's statistics passes,
   then block by block: read the same flat element range of every input,
   merge in fp32, check the range of the output dtype, cast.
4. Write: blocks are appended to the output shards as they come (the writer
   knows the whole layout up front), pages of consumed input blocks are
   dropped, and the output is renamed into place only when complete.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightops import __version__, card, hub, ops
from weightops.errors import AlignmentError, NumericError, WeightopsError
from weightops.io import fp8
from weightops.io.checkpoint import Checkpoint, is_adapter_dir, open_source, output_config
from weightops.io.writer import CheckpointWriter
from weightops.layers import is_vocabulary
from weightops.methods import MergeParams, get_method
from weightops.methods.base import Method, TensorJob

# 4M elements: 16 MB per input block in fp32; with three inputs and the
# temporaries of a fused merge, peak RSS stays at a few hundred MB.
DEFAULT_BLOCK_SIZE = 1 << 22
DTYPE_ARGS = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
              "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn}
# What block-scaled FP8 weights become with --dtype auto: the dtype of the releases' other weights.
FP8_DEFAULT_OUT = torch.bfloat16


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "", "auto"):
        return None
    if name not in DTYPE_ARGS:
        raise WeightopsError(f"--dtype must be one of auto, {', '.join(DTYPE_ARGS)}; got {name}")
    return DTYPE_ARGS[name]


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    action: str  # "merge" or "copy"
    reason: str = ""


@dataclass
class MergeResult:
    out: Path
    seconds: float
    bytes_read: int
    bytes_written: int
    warnings: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)


def _fmt_names(names: list[str], n: int = 3) -> str:
    shown = ", ".join(f"'{x}'" for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt)[6:]


def plan_tensors(template, models, *, out_dtype, allow_missing, allow_dtype_mix, exclude) -> tuple[list[PlannedTensor], list[str]]:
    """Align the models on the template's tensor names; errors name the first offenders.

    Output dtype: `out_dtype` for every float tensor, except that an FP8 `out_dtype` re-quantizes
    only the template's block-scaled FP8 weights; `None` keeps each tensor's dtype, and block-scaled
    FP8 becomes bfloat16. Integer and bool tensors are copied unchanged, with a note."""
    notes: list[str] = []
    missing: dict[int, list[str]] = {}
    shape_err, dtype_err = [], []
    pattern = re.compile(exclude) if exclude else None
    for src in [template, *models]:
        fp8.check_readable(src)
    fp8_out = out_dtype in fp8.FP8_DTYPES
    if fp8_out and not any(isinstance(i, fp8.BlockScaledInfo) for i in template.infos.values()):
        raise WeightopsError(f"--dtype {_dtype_name(out_dtype)} re-quantizes the block-scaled FP8 weights of an FP8 "
                             f"checkpoint; {template.path} has none (write bfloat16 or float32)")
    plan, buffers = [], []
    for name, info in template.infos.items():
        action, reason = "merge", ""
        if not info.is_float:
            action, reason = "copy", "non-float"
            buffers.append(name)
        elif pattern is not None and pattern.search(name):
            action, reason = "copy", "excluded"
        for i, m in enumerate(models):
            mi = m.infos.get(name)
            if mi is None:
                missing.setdefault(i, []).append(name)
                action, reason = "copy", "missing in a model"
                continue
            if tuple(mi.shape) != tuple(info.shape):
                hint = ""
                if is_vocabulary(name) and not shape_err:
                    hint = (" (the vocabularies differ: `weightops merge` aligns rows by id; a mergekit config with "
                            "`tokenizer_source: union`, `base` or a model, run by `weightops run CONFIG OUT`, aligns them by "
                            "token: docs/merging.md)")
                shape_err.append(f"'{name}' is {list(mi.shape)} in model {i + 1} ({m.path}) but {list(info.shape)} in {template.path}{hint}")
            elif info.is_float != mi.is_float or (info.is_float and mi.dtype != info.dtype and not allow_dtype_mix):
                dtype_err.append(f"'{name}' is {_dtype_name(mi.dtype)} in model {i + 1} but {_dtype_name(info.dtype)} in {template.path}")
        if isinstance(info, fp8.BlockScaledInfo):
            dt = out_dtype if out_dtype is not None else FP8_DEFAULT_OUT
        elif info.is_float and out_dtype is not None and not fp8_out:
            dt = out_dtype
        else:
            dt = info.dtype
        plan.append(PlannedTensor(name, tuple(info.shape), info.dtype, dt, action, reason))
    if shape_err:
        raise AlignmentError(f"shape mismatch: {shape_err[0]}" + (f" (+{len(shape_err) - 1} more)" if len(shape_err) > 1 else ""))
    if dtype_err:
        raise AlignmentError(f"dtype mismatch: {dtype_err[0]}" + (f" (+{len(dtype_err) - 1} more)" if len(dtype_err) > 1 else "")
                             + "; pass --allow-dtype-mix to merge in fp32 anyway")
    extra = {i: sorted(set(m.infos) - set(template.infos)) for i, m in enumerate(models)}
    extra = {i: v for i, v in extra.items() if v}
    if (missing or extra) and not allow_missing:
        parts = [f"model {i + 1} lacks {len(v)} tensor(s) of {template.path}: {_fmt_names(v)}" for i, v in missing.items()]
        parts += [f"model {i + 1} has {len(v)} tensor(s) not in {template.path}: {_fmt_names(v)}" for i, v in extra.items()]
        raise AlignmentError("; ".join(parts) + " (--allow-missing copies missing tensors from the base and ignores extra ones)")
    f64 = [p.name for p in plan if p.action == "merge" and p.in_dtype == torch.float64]
    if f64:
        notes.append(f"{len(f64)} float64 tensor(s) merged in float32 precision (written as float64): {_fmt_names(f64)}")
    if buffers:
        notes.append(f"{len(buffers)} integer/bool tensor(s) are not weights and were copied from {template.path} "
                     f"unchanged: {_fmt_names(buffers)}")
    for i, v in missing.items():
        notes.append(f"model {i + 1} lacks {len(v)} tensor(s); copied from the base: {_fmt_names(v)}")
    for i, v in extra.items():
        notes.append(f"model {i + 1} has {len(v)} tensor(s) not in the base; ignored: {_fmt_names(v)}")
    return plan, notes


class _Numerics:
    """NaN/Inf in the inputs and the output dtype's range, at the cost of one reduction per block.

    By default only the merged block is checked (one aminmax, which also gives
    the range check); when it holds NaN/Inf the inputs are scanned to name the
    culprits. A NaN that a DARE drop or a trim removes therefore goes
    unreported unless `strict`, which checks every input block exactly first.
    NaN/Inf that the merge makes from finite inputs (float32 overflow) fail
    under `strict` and are a warning that says so otherwise.
    """

    def __init__(self, strict: bool, clamp: bool):
        self.strict, self.clamp = strict, clamp
        self.nonfinite: dict[str, list[str]] = {}
        self.produced: dict[str, int] = {}
        self.clamped: dict[str, int] = {}

    def _scan_inputs(self, name: str, blocks: list[tuple[str, torch.Tensor]]) -> bool:
        found = False
        for who, x in blocks:
            if x is None or not x.is_floating_point() or x.numel() == 0 or bool(torch.isfinite(x).all()):
                continue
            found = True
            if self.strict:
                raise NumericError(f"NaN/Inf in tensor '{name}' of {who} (--strict)")
            self.nonfinite.setdefault(name, [])
            if who not in self.nonfinite[name]:
                self.nonfinite[name].append(who)
        return found

    def before(self, name: str, blocks: list[tuple[str, torch.Tensor]]) -> None:
        if self.strict:
            self._scan_inputs(name, blocks)

    def finalize(self, name: str, x: torch.Tensor, out_dtype: torch.dtype, inputs=()) -> torch.Tensor:
        if x.numel() == 0:
            return x.to(out_dtype)
        lo, hi = torch.aminmax(x)
        lo, hi = lo.item(), hi.item()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            if not self._scan_inputs(name, list(inputs)):
                bad = int((~torch.isfinite(x)).sum())
                if self.strict:
                    raise NumericError(f"tensor '{name}': the merge made {bad} NaN/Inf value(s) from finite inputs "
                                       f"(float32 overflow; check --weights/--lambda) (--strict)")
                self.produced[name] = self.produced.get(name, 0) + bad
            return x.to(out_dtype)
        if out_dtype in (torch.float16, torch.bfloat16):
            fmax = torch.finfo(out_dtype).max
            if max(-lo, hi) > fmax:
                n_over = int((x.abs() > fmax).sum())
                if not self.clamp:
                    raise NumericError(
                        f"tensor '{name}': {n_over} merged value(s) exceed the {str(out_dtype)[6:]} range "
                        f"(max |x| = {max(-lo, hi):.4g}); pass --clamp to clamp them or --dtype float32"
                    )
                x = x.clamp(-fmax, fmax)
                self.clamped[name] = self.clamped.get(name, 0) + n_over
        return x.to(out_dtype)

    def messages(self) -> list[str]:
        out = [f"NaN/Inf in input tensor '{n}' of {', '.join(w)}" for n, w in self.nonfinite.items()]
        out += [f"output not finite: the merge made {c} NaN/Inf value(s) in '{n}' from finite inputs "
                f"(float32 overflow; check --weights/--lambda; --strict makes this an error)" for n, c in self.produced.items()]
        out += [f"clamped {c} value(s) of '{n}' to the output dtype's range" for n, c in self.clamped.items()]
        return out


_NESTED = contextvars.ContextVar("weightops_nested_progress", default=None)


@contextlib.contextmanager
def nested_progress(label: str | None):
    """Inside this block a quiet run_streaming still shows its byte counter and rate, labelled, under the
    caller's own bar (a recipe step); label None: stay quiet."""
    tok = _NESTED.set(label)
    try:
        yield
    finally:
        _NESTED.reset(tok)


def _progress(total: int, quiet: bool, desc: str):
    from tqdm.auto import tqdm

    nested = _NESTED.get()
    if quiet and nested is not None:
        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{nested} {desc}", leave=False,
                    delay=1.0, dynamic_ncols=True, file=sys.stderr, position=1)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=quiet,
                delay=1.0, dynamic_ncols=True, file=sys.stderr)


def merge(models: Sequence[str | os.PathLike], *, out: str | os.PathLike, base: str | os.PathLike | None = None,
          method: str = "linear", weights: Sequence[float] | None = None, lam: float | None = None,
          density: float | None = None, gamma: float | None = None, drop_rate: float | None = None,
          rescale: str | None = None, q: float | Sequence[float] | None = None, trim_scope: str | None = None,
          t: float | None = None, normalize: bool | None = None, epsilon: float | Sequence[float] | None = None,
          select_topk: float | None = None, nuslerp_flatten: bool | None = None, nuslerp_row_wise: bool | None = None,
          max_iter: int | None = None, tol: float | None = None, filter_wise: bool | None = None,
          eps: float | None = None, r: float | None = None, alpha: float | None = None, scale: float | None = None,
          seed: int = 0, dtype: str | None = None, shard_size: str | int = "5GB", block_size: int | None = None, threads: int | None = None,
          kernels: str = "auto", allow_missing: bool = False, allow_dtype_mix: bool = False,
          exclude: str | None = None, clamp: bool = False, strict: bool = False, force: bool = False,
          quiet: bool = False, command: list[str] | None = None) -> MergeResult:
    """Merge checkpoints (or LoRA adapters on `base`) into `out`; see `weightops merge --help`."""
    m = get_method(method)
    models = [str(x) for x in models]
    n = len(models)
    if n < m.min_models or (m.max_models is not None and n > m.max_models):
        want = str(m.min_models) if m.max_models == m.min_models else f"at least {m.min_models}"
        raise WeightopsError(f"method {m.name} takes {want} model(s), got {n}")
    if m.needs_base and base is None:
        raise WeightopsError(f"method {m.name} needs --base (the model the others were fine-tuned from)")
    params = m.resolve(MergeParams(weights=weights, lam=lam, density=density, gamma=gamma, drop_rate=drop_rate,
                                   rescale=rescale, q=q, trim_scope=trim_scope, t=t, normalize=normalize, epsilon=epsilon,
                                   select_topk=select_topk, nuslerp_flatten=nuslerp_flatten,
                                   nuslerp_row_wise=nuslerp_row_wise, max_iter=max_iter, tol=tol, filter_wise=filter_wise,
                                   eps=eps, r=r, alpha=alpha, scale=scale, seed=seed), n)
    base_src = Checkpoint(base) if base is not None else None
    if base_src is None and any(is_adapter_dir(x) for x in models):
        raise WeightopsError("LoRA adapters among the models need --base (the model they were trained on)")
    sources = [open_source(x, base_src) for x in models]
    return run_streaming(m, params, base_src, sources, out=out, dtype=dtype, shard_size=shard_size,
                         block_size=block_size, threads=threads, kernels=kernels, allow_missing=allow_missing,
                         allow_dtype_mix=allow_dtype_mix, exclude=exclude, clamp=clamp, strict=strict, force=force,
                         quiet=quiet, command=command, manifest_extra={"method": m.name, "params": params.as_dict(), "seed": seed})


def run_streaming(method: Method, params, base_src, sources: list, *, out, dtype: str | None = None,
                  shard_size="5GB", block_size: int | None = None, threads: int | None = None, kernels: str = "auto",
                  allow_missing: bool = False, allow_dtype_mix: bool = False, exclude: str | None = None,
                  clamp: bool = False, strict: bool = False, force: bool = False, quiet: bool = False,
                  command: list[str] | None = None, manifest_extra: dict | None = None,
                  extra_json: dict | None = None) -> MergeResult:
    """The one streaming loop behind every command that writes a model.

    `method` (any `Method`, registered or not: merges, pruning, grafting,
    patching) maps the same block of the base and of each source to an output
    block; everything else (alignment, statistics passes, numerics checks,
    atomic sharded writing, page release, progress, manifest) happens here.
    `extra_json` files are written next to the weights; `manifest_extra` is
    merged into weightops.json.
    """
    t0 = time.perf_counter()
    block_size = int(block_size or DEFAULT_BLOCK_SIZE)
    if block_size < 1:
        raise WeightopsError("--block-size must be at least 1")
    out_dtype = parse_dtype(dtype)
    ops.use_kernels(kernels)
    if threads:
        torch.set_num_threads(int(threads))
    n = len(sources)
    template = base_src if base_src is not None else sources[0]
    plan, notes = plan_tensors(template, sources, out_dtype=out_dtype, allow_missing=allow_missing,
                               allow_dtype_mix=allow_dtype_mix, exclude=exclude)
    numerics = _Numerics(strict, clamp)
    everything = ([base_src] if base_src is not None else []) + list(sources)

    bars = {"stats": None}  # the bar that statistics passes (job.blocks) report to

    def read_main(job: TensorJob, start: int, stop: int, which=None):
        idx = range(len(job.models)) if which is None else which
        b = job.base.read(job.name, start, stop) if job.base is not None else None
        xs = [job.models[i].read(job.name, start, stop) for i in idx]
        if any(x.dtype == torch.float64 for x in xs) or (b is not None and b.dtype == torch.float64):
            # the ops compute in float32 whatever the input; float64 is announced in the plan's notes
            b = b.float() if b is not None else None
            xs = [x.float() for x in xs]
        return b, xs

    def read_block(job: TensorJob, start: int, stop: int, which=None):
        b, xs = read_main(job, start, stop, which)
        bar = bars["stats"]
        if bar is not None:
            nb = sum(x.numel() * x.element_size() for x in xs) + (b.numel() * b.element_size() if b is not None else 0)
            if bar.total is not None:
                bar.total += nb
            bar.update(nb)
        return b, xs

    # FP8 outputs are re-quantized with fresh per-block scales: their blocks are whole 128-row bands,
    # and each is followed in the layout by its `*_scale_inv` tensor, written once its bands are done.
    fp8_blocks = {p.name: template.infos[p.name].block for p in plan if p.out_dtype in fp8.FP8_DTYPES}

    def tensor_block_size(p: PlannedTensor) -> int:
        blk = fp8_blocks.get(p.name)
        return block_size if blk is None else fp8.band_elements(p.shape, block_size, blk)

    def make_job(p: PlannedTensor) -> TensorJob:
        return TensorJob(p.name, p.shape, p.out_dtype, base_src, sources, tensor_block_size(p), read_block)

    def scale_entry(p: PlannedTensor) -> tuple[str, torch.dtype, tuple[int, int]]:
        return p.name + fp8.SCALE_SUFFIX, torch.float32, fp8.scale_shape(p.shape, fp8_blocks[p.name])

    scales: dict[str, list[torch.Tensor]] = {n: [] for n in fp8_blocks}

    def emit(p: PlannedTensor, y: torch.Tensor, named) -> None:
        """Check, cast (or quantize) and write one output block; an FP8 tensor's scales follow its last band."""
        blk = fp8_blocks.get(p.name)
        if blk is None:
            writer.write(p.name, numerics.finalize(p.name, y, p.out_dtype, named))
            return
        q, sc = fp8.quantize_band(numerics.finalize(p.name, y, torch.float32, named), p.shape[1], p.out_dtype, blk)
        writer.write(p.name, q)
        scales[p.name].append(sc)
        if sum(x.shape[0] for x in scales[p.name]) == scale_entry(p)[2][0]:
            writer.write(scale_entry(p)[0], torch.cat(scales.pop(p.name)).reshape(-1))

    metadata = {"weightops_version": __version__, "weightops_method": method.name}
    layout = []
    for p in plan:
        layout.append((p.name, p.out_dtype, p.shape))
        if p.name in fp8_blocks:
            layout.append(scale_entry(p))
    bytes_read = 0
    template_label = "base" if base_src is not None else "model 1"
    with CheckpointWriter(out, layout, shard_size=shard_size, metadata=metadata, force=force) as writer:
        merge_jobs = [make_job(p) for p in plan if p.action == "merge"]
        with _progress(None, quiet, f"{method.name}: model-wide statistics") as bars["stats"]:
            model_state = method.prepare_model(merge_jobs, params)
        total = sum(template.infos[p.name].nbytes * (1 if p.action == "copy" else len(everything)) for p in plan)
        with _progress(total, quiet, method.name) as bar:
            bars["stats"] = bar
            for ti, p in enumerate(plan):
                bar.set_postfix_str(f"tensor {ti + 1}/{len(plan)}", refresh=False)
                if p.action == "copy":
                    info = template.infos[p.name]
                    step = tensor_block_size(p)
                    for start in range(0, info.numel, step):
                        stop = min(info.numel, start + step)
                        x = template.read(p.name, start, stop)
                        if x.dtype == p.out_dtype and p.name not in fp8_blocks:
                            writer.write(p.name, x)
                        else:
                            emit(p, x.float(), [(template_label, x)])
                        template.release(p.name, start, stop)
                        bytes_read += x.numel() * x.element_size()
                        bar.update(x.numel() * x.element_size())
                    continue
                job = make_job(p)
                state = method.prepare(job, params, model_state)
                for start, stop in job.ranges():
                    b, xs = read_main(job, start, stop)
                    named = ([("base", b)] if b is not None else []) + [(f"model {i + 1}", x) for i, x in enumerate(xs)]
                    numerics.before(p.name, named)
                    emit(p, method.merge_block(job, params, state, start, b, xs), named)
                    nb = sum(x.numel() * x.element_size() for x in xs) + (b.numel() * b.element_size() if b is not None else 0)
                    bytes_read += nb
                    bar.update(nb)
                    for s in everything:
                        s.release(p.name, start, stop)
        fp8_block = next(iter(fp8_blocks.values()), None)
        written: dict[torch.dtype, int] = {}
        for p in plan:
            written[p.out_dtype] = written.get(p.out_dtype, 0) + math.prod(p.shape)
        for f in template.sidecar_files():
            cfg = output_config(f, written, fp8_block) if f.name == "config.json" else None
            if cfg is not None:
                writer.add_json(f.name, cfg)
            else:
                writer.add_file(f)
        for name, obj in (extra_json or {}).items():
            writer.add_json(name, output_config(obj, written, fp8_block) if name == "config.json" else obj)
        warnings = notes + numerics.messages()
        manifest = {
            "weightops_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "method": method.name,
            **(manifest_extra or {}),
            "dtype": str(out_dtype)[6:] if out_dtype else "auto",
            "block_size": block_size,
            "threads": torch.get_num_threads(),
            "kernels": ops.kernels_in_use(),
            "inputs": _inputs_manifest(base_src, sources),
            "outputs": {
                "shards": [writer.shard_name(i) for i in range(writer.n_shards)],
                "total_bytes": writer.total_bytes,
                "tensors": _manifest_tensors(plan, writer.tensor_sha256(), [scale_entry(p) for p in plan if p.name in fp8_blocks]),
            },
            "warnings": warnings,
            "seconds": round(time.perf_counter() - t0, 3),
            "bytes_read": bytes_read,
        }
        writer.add_json("weightops.json", manifest)
        if card.enabled():
            writer.add_text("README.md", card.render(manifest, Path(out).name))
        writer.commit()
    for s in everything:
        s.close()
    return MergeResult(Path(out), time.perf_counter() - t0, bytes_read, writer.total_bytes, warnings, manifest)


def _inputs_manifest(base_src, sources) -> list[dict]:
    """Each input: role, path, kind, files (sha256), and the hub id/revision/commit it was resolved from.
    A source may describe itself instead (`manifest_inputs`, e.g. the mergekit planner's routed inputs)."""
    first = base_src if base_src is not None else (sources[0] if sources else None)
    custom = getattr(first, "manifest_inputs", None)
    if custom is not None:
        return custom()

    def one(s, **role):
        return {**role, "path": str(s.path), "kind": s.kind, **hub.describe(s.path), "files": s.file_hashes()}
    return ([one(base_src, role="base")] if base_src is not None else []) + \
        [one(s, role="model", index=i + 1) for i, s in enumerate(sources)]


def _manifest_tensors(plan: list[PlannedTensor], hashes: dict[str, str], scale_entries) -> dict:
    out = {p.name: {"dtype": _dtype_name(p.out_dtype), "shape": list(p.shape), "action": p.action,
                    **({"reason": p.reason} if p.reason else {}), "sha256": hashes[p.name]} for p in plan}
    for name, dt, shape in scale_entries:
        out[name] = {"dtype": _dtype_name(dt), "shape": list(shape), "action": "fp8 block scales", "sha256": hashes[name]}
    return out


def load_manifest(path) -> dict:
    p = Path(path) / "weightops.json"
    if not p.is_file():
        raise WeightopsError(f"{path}: no weightops.json manifest (was it written by weightops?)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise WeightopsError(f"{p}: corrupt manifest ({e})") from None
