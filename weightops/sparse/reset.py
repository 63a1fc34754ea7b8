"""HFT-style partial reset (Hui et al. 2025, "Half Fine-Tuning"): θ = θ0 + M⊙δ.

M keeps the fine-tuned value; the rest (a `fraction` of the eligible
tensors, in expectation) goes back to the base. Granularity (`by`):
- parameter: element j of tensor T is reset iff Philox(key(seed, T), j) falls
  below `fraction` (the DARE mask generator of weightops.ops), so the mask is
  a pure function of (seed, T, j): independent of block size and tensor order;
- row: the same draw per row (slice along dim 0; a 1-D tensor's rows are its
  elements);
- tensor: one draw per tensor;
- hft: the paper's category rule, per transformer layer: of the 4 attention
  matrices 2 are reset; of the FFN matrices ceil(n/2) in a random half of the
  layers and floor(n/2) in the others (Llama's 3: 2 or 1; BERT's 2: 1 and 1);
  1 of the 2 norms; a matrix's bias goes with it. Drawn with Python's
  random.Random(seed); `fraction` is not used (the rule fixes ~50%).
Tensors outside `scope` (by default: outside the transformer blocks, i.e.
embeddings, heads, final norms, which HFT never freezes) keep their
fine-tuned values. The achieved fraction is reported in the manifest.
"""
from __future__ import annotations

import random
import re

import torch

from weightops import ops
from weightops.errors import WeightopsError, check_finite
from weightops.methods.base import Method

GRANULARITIES = ("parameter", "row", "tensor", "hft")

# module-name suffixes of each HFT category (Llama/Mistral, BERT/RoBERTa, GPT-2 style names)
_ATTN = re.compile(r"(self_attn\.[qkvo]_proj|attention\.self\.(query|key|value)|attention\.output\.dense|attn\.(c_attn|c_proj)|attn\.(q|k|v|out)_proj)$")
_FFN = re.compile(r"(mlp\.(gate|up|down)_proj|(?<!attention\.)output\.dense|intermediate\.dense|mlp\.(c_fc|c_proj|fc1|fc2))$")
_NORM = re.compile(r"(input_layernorm|post_attention_layernorm|attention\.output\.LayerNorm|(?<!attention\.)output\.LayerNorm|ln_1|ln_2)$")
_IN_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+))\.(.+?)(?:\.(weight|bias))?$")


def hft_reset_tensors(names: list[str], seed: int) -> tuple[set[str], dict]:
    """Tensor names the HFT category rule resets, and a summary of the draw."""
    layers: dict[int, dict[str, list[str]]] = {}
    module_tensors: dict[str, list[str]] = {}
    for n in names:
        m = _IN_LAYER.match(n)
        if not m:
            continue
        prefix, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        for cat, rx in (("attention", _ATTN), ("ffn", _FFN), ("norm", _NORM)):
            if rx.search(rest):
                module = f"{prefix}.{rest}"
                cats = layers.setdefault(idx, {"attention": [], "ffn": [], "norm": []})
                if module not in cats[cat]:
                    cats[cat].append(module)
                module_tensors.setdefault(module, []).append(n)
                break
    if not layers:
        raise WeightopsError("--by hft found no attention/FFN/norm modules inside transformer layers; use --by parameter|row|tensor")
    rng = random.Random(seed)
    order = sorted(layers)
    more_ffn = set(rng.sample(order, len(order) // 2))
    reset_modules: list[str] = []
    for i in order:
        cats = layers[i]
        reset_modules += rng.sample(sorted(cats["attention"]), len(cats["attention"]) // 2)
        nf = len(cats["ffn"])
        reset_modules += rng.sample(sorted(cats["ffn"]), (nf + 1) // 2 if i in more_ffn else nf // 2)
        reset_modules += rng.sample(sorted(cats["norm"]), len(cats["norm"]) // 2)
    reset = {t for mod in reset_modules for t in module_tensors[mod]}
    return reset, {"layers": len(order), "layers_with_more_ffn_reset": sorted(more_ffn), "modules_reset": sorted(reset_modules)}


class Reset(Method):
    """θft where the reset mask keeps, θ0 elsewhere (sources: [finetuned])."""

    name = "reset"
    summary = "HFT-style partial reset of fine-tuned parameters to the base"

    def __init__(self, fraction: float, by: str, seed: int, scope: set[str], hft_reset: set[str] | None = None):
        self.fraction, self.by, self.seed, self.scope = fraction, by, seed, scope
        self.thr = ops.drop_threshold(fraction)
        self.hft_reset = hft_reset or set()
        self.stats = {"eligible": 0, "reset": 0}  # filled while merging; read when the manifest is written

    def prepare(self, job, p, model_state):
        return ops.model_key(self.seed, 0, job.name)

    def keep_block(self, job, key, start: int, n: int) -> torch.Tensor:
        """bool[n]: which elements [start, start + n) keep the fine-tuned value."""
        if self.by == "parameter":
            return ops.philox_keep_mask(key, start, n, self.thr)
        if self.by == "tensor":
            return ops.philox_keep_mask(key, 0, 1, self.thr).expand(n)
        if self.by == "hft":
            return torch.full((n,), job.name not in self.hft_reset, dtype=torch.bool)
        cols = job.numel // job.shape[0] if len(job.shape) > 1 else 1
        r0, r1 = start // cols, (start + n - 1) // cols
        rows = ops.philox_keep_mask(key, r0, r1 - r0 + 1, self.thr).repeat_interleave(cols)
        off = start - r0 * cols
        return rows[off:off + n]

    def merge_block(self, job, p, state, start, base, models):
        if job.name not in self.scope:
            return models[0].float()  # outside the scope: the fine-tuned tensor, unchanged
        keep = self.keep_block(job, state, start, base.numel())
        self.stats["eligible"] += base.numel()
        self.stats["reset"] += base.numel() - int(keep.sum())
        return torch.where(keep, models[0].float(), base.float())


def reset(base, finetuned, out, *, fraction: float = 0.5, by: str = "parameter", seed: int = 0,
          scope: str | None = None, dtype=None, shard_size="5GB", block_size=None, force: bool = False,
          quiet: bool = True, command=None):
    """Reset a fraction of the fine-tuned parameters inside `scope` to the base; returns the MergeResult."""
    check_finite(fraction=fraction)
    from weightops.engine import run_streaming
    from weightops.io.checkpoint import Checkpoint, open_source
    from weightops.sparse.graft import DEFAULT_SCOPE, eligible_names

    if by not in GRANULARITIES:
        raise WeightopsError(f"--by must be one of {', '.join(GRANULARITIES)}, got {by}")
    if not 0 <= fraction <= 1:
        raise WeightopsError(f"--fraction must be in [0, 1] (the share reset to the base), got {fraction}")
    base_src = Checkpoint(base)
    ft = open_source(finetuned, base_src)
    elig, _ = eligible_names(base_src.infos, scope, None)
    if not elig:
        raise WeightopsError(f"no tensor matches --scope {scope or DEFAULT_SCOPE!r}; nothing to reset")
    hft_set, hft_info = (hft_reset_tensors(elig, seed) if by == "hft" else (None, None))
    method = Reset(fraction, by, seed, set(elig), hft_set)
    info = {"paper": "https://arxiv.org/abs/2404.18466", "fraction": fraction if by != "hft" else None, "by": by,
            "seed": seed, "scope": scope or DEFAULT_SCOPE, "stats": method.stats, **({"hft": hft_info} if hft_info else {})}
    # the stats dict is filled during the run and serialised into the manifest after it
    return run_streaming(method, None, base_src, [ft], out=out, dtype=dtype, shard_size=shard_size,
                         block_size=block_size, force=force, quiet=quiet, command=command,
                         manifest_extra={"reset": info})

