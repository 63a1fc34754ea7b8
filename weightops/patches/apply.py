"""Apply a patch to a target version: θ = θv2 + s·ΔW(v1) (PortLLM; s = 1 in the paper).

The model is written by the one streaming loop (`weightops.engine.run_streaming`)
with `PatchAdd`, a Method that adds the patch's ΔW block (for low-rank
entries only the rows of B that the block covers) to V2's block in fp32, sets
`value` entries, and passes every other tensor through unchanged.

`as_adapter=True` writes a PEFT LoRA adapter instead (low-rank patches only),
to load with peft on top of V2: per-module ranks and alphas go into
`rank_pattern` / `alpha_pattern` with alpha = s·scale·r, so PEFT's alpha/r is
the patch's scale; `value` entries become `modules_to_save`.
"""
from __future__ import annotations

import datetime as _dt
import math
import re
import time
from collections import Counter
from pathlib import Path

import torch

from weightops import __version__
from weightops.engine import MergeResult, run_streaming
from weightops.errors import WeightopsError, check_finite
from weightops.io.adapter import PREFIX
from weightops.io.checkpoint import ADAPTER_CONFIG, Checkpoint
from weightops.methods.base import MergeParams, Method
from weightops.patches.check import check_patch
from weightops.patches.format import Patch, PatchEntry

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Matrices PEFT adapts as nn.Embedding (ΔW = (B·A)ᵀ, keys lora_embedding_A/B); everything else as nn.Linear.
EMBEDDING_NAME = re.compile(r"(^|\.)(\w*embed\w*|wte|wpe)\.weight$")


class PatchAdd(Method):
    name = "patch"
    summary = "θ = θv2 + s·ΔW(v1): add a portable patch to another version (PortLLM)"
    reference_url = "https://arxiv.org/abs/2410.10870"
    min_models = 0
    max_models = 0

    def __init__(self, patch: Patch, by_target: dict[str, PatchEntry], scale: float):
        self.patch, self.by_target, self.scale = patch, by_target, scale

    def prepare(self, job, p, model_state):
        return self.by_target.get(job.name)

    def merge_block(self, job, p, entry, start, base, models):
        if entry is None:
            return base  # not a target: the bytes go through as they are
        stop = start + base.numel()
        if entry.kind == "value":
            return self.patch.value(entry, start, stop)
        # s folds into the factor's scale, and the add promotes a bf16/fp16 base to fp32: one pass, no copies
        return torch.add(base, self.patch.delta(entry, start, stop, self.scale))


def _patch_info(p: Patch, scale: float, renamed: dict) -> dict:
    return {"path": str(p.path), "meta_sha256": p.meta["meta_sha256"], "base_fingerprint": p.fingerprint_sha256,
            "scale": scale, "renamed": renamed, "targets": len(p.entries)}


def apply_patch(patch, to, out, *, scale: float = 1.0, rename=None, as_adapter: bool = False,
                allow_dtype_mix: bool = False, dtype: str | None = None, shard_size="5GB",
                block_size: int | None = None, threads: int | None = None, kernels: str = "auto",
                clamp: bool = False, strict: bool = False, force: bool = False, quiet: bool = False,
                command: list[str] | None = None) -> MergeResult:
    """Write V2 (`to`) plus the patch to `out` (a model, or with `as_adapter` a PEFT adapter)."""
    given = scale
    try:
        scale = float(scale)  # recipes may hand over YAML 1.1 strings such as "1e-1"
    except (TypeError, ValueError):
        scale = math.nan
    if not math.isfinite(scale):
        raise WeightopsError(f"--scale must be a finite number, got {given!r}")
    check_finite(scale=scale)
    p = Patch(patch)
    target = Checkpoint(to)
    rep = check_patch(p, target, rename=rename, allow_dtype_mix=allow_dtype_mix)
    rep.raise_if_incompatible()
    renamed = {k: v for k, v in rep.mapping.items() if k != v}
    if as_adapter:
        if dtype not in (None, "auto"):
            raise WeightopsError("--dtype does not apply to --as-adapter (the factors are written as stored)")
        return write_adapter(p, rep.mapping, target, out, scale=scale, force=force, command=command)
    method = PatchAdd(p, {rep.mapping[n]: e for n, e in p.entries.items()}, scale)
    res = run_streaming(method, MergeParams(), target, [], out=out, dtype=dtype, shard_size=shard_size,
                        block_size=block_size, threads=threads, kernels=kernels, allow_dtype_mix=allow_dtype_mix,
                        clamp=clamp, strict=strict, force=force, quiet=quiet, command=command,
                        manifest_extra={"patch": _patch_info(p, scale, renamed)})
    p.close()
    return res


def write_adapter(p: Patch, mapping: dict[str, str], target: Checkpoint, out, *, scale: float = 1.0,
                  force: bool = False, command: list[str] | None = None) -> MergeResult:
    """The patch as a PEFT LoRA adapter for `target`, written atomically."""
    from weightops.io.writer import CheckpointWriter

    t0 = time.perf_counter()
    dense = [n for n, e in p.entries.items() if e.kind == "dense"]
    if dense:
        raise WeightopsError(f"--as-adapter needs a low-rank patch, but {len(dense)} target(s) are dense deltas "
                             f"(e.g. '{dense[0]}'); create the patch with --non-matrix skip, or apply it without --as-adapter")
    low = {n: e for n, e in p.entries.items() if e.kind == "lowrank"}
    fifo = {e.layout == "fan_in_fan_out" for e in low.values() if e.layout != "embedding"}
    if len(fifo) > 1:
        raise WeightopsError("--as-adapter: the patch mixes fan_in_fan_out and linear factors, which one PEFT config cannot express")
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas, to_save = {}, {}, set()
    for name, e in p.entries.items():
        t = mapping[name]
        if e.kind == "value":
            tensors[PREFIX + t] = p.tensor(e.keys[0])
            to_save.add(t.rsplit(".", 1)[0])
            continue
        if not t.endswith(".weight"):
            raise WeightopsError(f"--as-adapter: '{t}' is not a module weight; PEFT adapts only '<module>.weight' tensors")
        module = t[: -len(".weight")]
        a, b = p.tensor(e.keys[0]), p.tensor(e.keys[1])
        embedding = e.layout == "embedding" or bool(EMBEDDING_NAME.search(t))
        if embedding:
            if e.layout == "linear":  # ΔW = B·A, while PEFT's embedding ΔW is (B'·A')ᵀ: B' = Aᵀ, A' = Bᵀ
                a, b = b.T.contiguous(), a.T.contiguous()
            tensors[f"{PREFIX}{module}.lora_embedding_A"], tensors[f"{PREFIX}{module}.lora_embedding_B"] = a, b
        else:
            tensors[f"{PREFIX}{module}.lora_A.weight"], tensors[f"{PREFIX}{module}.lora_B.weight"] = a, b
        ranks[module] = int(e.rank)
        alphas[module] = e.scale * scale * e.rank  # PEFT scales by alpha / r
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else float(r)
    src_cfg = p.meta.get("source", {}).get("peft_config") or {}
    config = {
        "peft_type": "LORA",
        "task_type": src_cfg.get("task_type"),
        "base_model_name_or_path": str(target.path),
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != alpha},
        "modules_to_save": sorted(to_save) or None,
        "use_rslora": False,
        "fan_in_fan_out": fifo == {True},
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
    }
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with CheckpointWriter(out, layout, shard_size=1 << 62, file_name=ADAPTER_WEIGHTS, force=force,
                          metadata={"format": "pt"}) as w:
        for k, v in tensors.items():
            w.write(k, v.contiguous().reshape(-1))
        w.add_json(ADAPTER_CONFIG, config)
        manifest = {
            "weightops_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "method": "patch-as-adapter",
            "patch": _patch_info(p, scale, {k: v for k, v in mapping.items() if k != v}),
            "inputs": [{"role": "base", "path": str(target.path), "kind": target.kind}],
            "outputs": {"tensors": w.tensor_sha256(), "total_bytes": w.total_bytes},
        }
        w.add_json("weightops.json", manifest)
        w.commit()
    return MergeResult(Path(out), time.perf_counter() - t0, 0, w.total_bytes, [], manifest)
