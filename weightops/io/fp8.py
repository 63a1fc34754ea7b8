"""FP8 weights with per-block scales (the DeepSeek-V3 / Qwen3-FP8 layout), read as fp32 and written back.

The one convention we know: a 2-D `NAME` stored as F8_E4M3 (or F8_E5M2) next to a float
`NAME_scale_inv` of shape (⌈rows/br⌉, ⌈cols/bc⌉), one scale per br×bc block, with
W[r, c] = fp8[r, c] · scale_inv[r // br, c // bc]; config.json says
`quantization_config: {quant_method: fp8, weight_block_size: [br, bc]}` (128×128 in every
release we know, and the default when config.json does not say). This is what
transformers' FineGrainedFP8 integration loads (`FP8Linear.weight_scale_inv`).

Any other FP8 tensor (no `_scale_inv`, per-tensor or per-channel `weight_scale`, a scale
grid of another shape) has a convention we do not know: `unknown_fp8` names it with the
reason, and every command refuses it rather than copy or misread it.

Reading is streamed: a flat element range [start, stop) needs only the rows of scales it
covers. Writing FP8 recomputes each block's scale as amax/max_fp8 from the merged fp32
values, so the writer must see whole 128-row bands at a time (`band_elements`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)
# The scale dtypes a release may store; they are read in fp32.
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Written when an FP8 checkpoint lost its quantization_config, so that transformers can load the output.
QUANT_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(DEFAULT_BLOCK)}


def block_size_from_config(config: dict) -> tuple[tuple[int, int] | None, str | None]:
    """(block, None) for an fp8 quantization_config (or none at all: the default block); (None, why) otherwise."""
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not qc:
        return DEFAULT_BLOCK, None
    method = qc.get("quant_method")
    if method != "fp8":
        return None, f"config.json's quantization_config has quant_method {method!r}, not 'fp8'"
    block = qc.get("weight_block_size")
    if block is None:
        return None, "config.json's fp8 quantization_config has no weight_block_size (per-tensor scales)"
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        return None, f"config.json's weight_block_size {block!r} is not two positive integers"
    return (int(block[0]), int(block[1])), None


@dataclass(frozen=True)
class BlockScaledInfo:
    """An FP8 weight and its block scales, seen as one float tensor (`read` gives fp32).

    Duck-types `TensorInfo` where the engine and the analyses look (name, dtype: the stored
    FP8 dtype, shape, numel, nbytes, is_float, file), so every command treats it as a
    float weight while the output dtype rules can still tell that it was FP8."""

    name: str
    raw: object  # TensorInfo of the FP8 data
    scale: object  # TensorInfo of the float scales
    block: tuple[int, int]

    @property
    def dtype(self) -> torch.dtype:
        return self.raw.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.raw.shape

    @property
    def numel(self) -> int:
        return self.raw.numel

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes + self.scale.nbytes

    @property
    def itemsize(self) -> int:
        return self.raw.itemsize

    @property
    def file(self):
        return self.raw.file

    is_float = True

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Flat elements [start, stop) of fp8 · scale_inv, in fp32 (the product is one fp32 rounding)."""
        x = self.raw.file.read(self.raw, start, stop).float()
        if x.numel() == 0:
            return x
        cols = self.shape[1]
        br, bc = self.block
        ncb = self.scale.shape[1]
        r0, r1 = start // cols, (stop - 1) // cols + 1
        b0, b1 = r0 // br, (r1 - 1) // br + 1
        s = self.scale.file.read(self.scale, b0 * ncb, b1 * ncb).float().reshape(b1 - b0, ncb)
        rows = s.repeat_interleave(br, dim=0)[r0 - b0 * br: r1 - b0 * br]  # one row of block scales per row
        full = rows.repeat_interleave(bc, dim=1)[:, :cols].reshape(-1)
        off = start - r0 * cols
        return x * full[off: off + (stop - start)]

    def release(self, start: int, stop: int) -> None:
        self.raw.file.release(self.raw, start, stop)


def find_block_scaled(infos: dict, config: dict) -> tuple[dict[str, BlockScaledInfo], dict[str, str]]:
    """The FP8 weights of a checkpoint we can read ({name: BlockScaledInfo}) and those we cannot ({name: why})."""
    block, why_not = block_size_from_config(config)
    known: dict[str, BlockScaledInfo] = {}
    unknown: dict[str, str] = {}
    for name, info in infos.items():
        if name.endswith(SCALE_SUFFIX):
            owner = infos.get(name[: -len(SCALE_SUFFIX)])
            if owner is None or owner.dtype not in FP8_DTYPES:
                what = "no tensor" if owner is None else f"a {str(owner.dtype)[6:]} tensor"
                unknown[name] = f"a block-scale tensor for {what} '{name[: -len(SCALE_SUFFIX)]}'"
            continue
        if info.dtype not in FP8_DTYPES:
            continue
        scale = infos.get(name + SCALE_SUFFIX)
        if scale is None:
            other = name + "_scale"  # compressed-tensors / FBGEMM: per-tensor or per-channel scales
            unknown[name] = (f"FP8 without a block scale '{name}{SCALE_SUFFIX}'"
                             + (f" (found '{other}': per-tensor/per-channel FP8 scales are not supported)" if other in infos else ""))
        elif why_not is not None:
            unknown[name] = why_not
        elif len(info.shape) != 2:
            unknown[name] = f"block-scaled FP8 of shape {list(info.shape)} (only 2-D weights are known)"
        elif scale.dtype not in SCALE_DTYPES:
            unknown[name] = f"its scale '{scale.name}' is {str(scale.dtype)[6:]} (known: float32, bfloat16, float16)"
        elif tuple(scale.shape) != scale_shape(info.shape, block):
            unknown[name] = (f"its scale '{scale.name}' is {list(scale.shape)}, not {list(scale_shape(info.shape, block))} "
                             f"(one per {block[0]}×{block[1]} block)")
        else:
            known[name] = BlockScaledInfo(name, info, scale, block)
    return known, unknown


def scale_shape(shape, block=DEFAULT_BLOCK) -> tuple[int, int]:
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def band_elements(shape, block_size: int, block=DEFAULT_BLOCK) -> int:
    """A block size (elements) of whole bands of block[0] rows, at least one band, near `block_size`."""
    band = block[0] * shape[1]
    return max(1, block_size // max(band, 1)) * max(band, 1)


def quantize_band(y: torch.Tensor, cols: int, dtype: torch.dtype, block=DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole rows (a multiple of block[0], or the last rows) of fp32 values → (fp8 values, fp32 scales).

    scale_inv = amax/max_fp8 per block (the DeepSeek-V3 rule; 1 for an all-zero block), values
    y/scale_inv rounded to nearest in FP8: every value within half an FP8 step of y."""
    br, bc = block
    fmax = torch.finfo(dtype).max
    rows = y.numel() // cols if cols else 0
    Y = y.reshape(rows, cols).float()
    nbr, ncb = math.ceil(rows / br), math.ceil(cols / bc)
    pad = torch.zeros(nbr * br, ncb * bc, dtype=torch.float32)
    pad[:rows, :cols] = Y.abs()
    amax = pad.reshape(nbr, br, ncb, bc).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / fmax, torch.ones(()))
    full = scale.repeat_interleave(br, dim=0)[:rows].repeat_interleave(bc, dim=1)[:, :cols]
    q = (Y / full).clamp(-fmax, fmax).to(dtype)
    return q.reshape(-1), scale


def check_readable(src) -> None:
    """FP8 we cannot read, and checkpoints quantized by other methods, are errors that name a tensor or the method."""
    from weightops.errors import AlignmentError

    unknown = getattr(src, "unknown_fp8", None) or {}
    if unknown:
        name, why = next(iter(unknown.items()))
        more = f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise AlignmentError(f"{src.path}: tensor '{name}' is {why}{more}; weightops reads FP8 only with a float "
                             f"'*{SCALE_SUFFIX}' per weight block (weight_block_size, 128×128 by default; docs/merging.md)")
    qc = (getattr(src, "config", None) or {}).get("quantization_config")
    if qc and qc.get("quant_method") != "fp8":
        raise AlignmentError(f"{src.path}: a {qc.get('quant_method')!r}-quantized checkpoint (config.json "
                             f"quantization_config); dequantize it first (weightops merges float and block-scaled FP8 weights)")
