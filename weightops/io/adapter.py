"""A PEFT LoRA adapter seen as a model: θ = θ0 + ΔW for each adapted matrix.

ΔW = s·B·A with s = alpha/r (or alpha/√r for rsLoRA; per-module r and alpha
from rank_pattern/alpha_pattern). A block of elements [start, stop) of ΔW
only needs the rows of B it covers, so adapters merge block-wise without
materialising the adapted model. Tensors saved whole in the adapter
(`modules_to_save`, e.g. a classifier head) replace the base's.

Biases, as peft's merge_and_unload treats them: with `bias="lora_only"` or
`"all"` the trained biases are saved (`X.base_layer.bias` for an adapted
module X, `Y.bias` for the others) and replace the base's; with
`lora_bias=True`, `X.lora_B.bias` adds s·lora_B.bias to X's bias.

Every adapter key names exactly one base tensor (an exact name, else a unique
suffix match; two candidates are an error), and LoRA factors of a module that
the config's `target_modules` (with `layers_to_transform`, `exclude_modules`)
does not select are an error: peft would silently skip them.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from weightops.errors import CheckpointError
from weightops.io.checkpoint import ADAPTER_CONFIG, Checkpoint
from weightops.io.safetensors_file import SafetensorsFile, TensorInfo

PREFIX = "base_model.model."


@dataclass
class LoraFactor:
    """ΔW = scale · B @ A (transposed for embeddings and fan_in_fan_out layers)."""

    a: TensorInfo
    b: TensorInfo
    scale: float
    transpose: bool
    rank: int
    alpha: float

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) in fp32 with ΔW = scale · B @ A in the base's layout (transposition applied)."""
        A = self.a.file.read(self.a, 0, self.a.numel).reshape(self.a.shape).float()
        B = self.b.file.read(self.b, 0, self.b.numel).reshape(self.b.shape).float()
        return (A.T, B.T) if self.transpose else (B, A)  # ΔW = (B @ A)ᵀ = Aᵀ @ Bᵀ

    def delta(self, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Flat elements [start, stop) of ΔW, in fp32."""
        B, A = self.factors()
        return lowrank_block(B, A, shape[1], start, stop, self.scale)


def lowrank_block(B: torch.Tensor, A: torch.Tensor, cols: int, start: int, stop: int, scale: float = 1.0) -> torch.Tensor:
    """Flat elements [start, stop) of scale · B @ A (fp32), computing only the rows the block covers."""
    if stop <= start:
        return torch.empty(0, dtype=torch.float32)
    r0, r1 = start // cols, (stop - 1) // cols + 1
    rows = (B[r0:r1].float() @ A.float()) * scale
    return rows.reshape(-1)[start - r0 * cols : stop - r0 * cols]


def _pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


class LoraAdapter:
    """A PEFT LoRA adapter directory applied on the checkpoint it was trained from."""

    kind = "lora"

    def __init__(self, path, base: Checkpoint):
        from weightops.io.checkpoint import _local

        self.path = _local(path)
        self.base = base
        try:
            self.config = json.loads((self.path / ADAPTER_CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path / ADAPTER_CONFIG}: unreadable ({e.__class__.__name__})") from None
        peft_type = self.config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise CheckpointError(f"{self.path}: {peft_type} adapters are not supported (only LoRA)")
        if self.config.get("use_dora"):
            raise CheckpointError(f"{self.path}: DoRA adapters are not supported (their update is not B·A)")
        weights = self.path / "adapter_model.safetensors"
        if not weights.is_file():
            pickled = self.path / "adapter_model.bin"
            if pickled.is_file():
                raise CheckpointError(f"{pickled}: pickled adapter; weightops never unpickles. Re-save with peft's save_pretrained(safe_serialization=True)")
            raise CheckpointError(f"{self.path}: adapter_model.safetensors is missing")
        self.file = SafetensorsFile(weights)
        self.files = [self.file]
        self.factors: dict[str, LoraFactor] = {}
        self.replaced: dict[str, TensorInfo] = {}
        self.bias_deltas: dict[str, tuple[TensorInfo, float]] = {}  # base bias name -> (lora_B.bias, scale)
        self._parse()
        self.infos = base.infos

    def _base_name(self, key: str, shown: str | None = None) -> str:
        """The base tensor `key` (an adapter key, prefix and all) stands for; errors name `shown` (the file's key)."""
        shown = shown or key
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name in self.base.infos:
            return name
        # Adapters trained on a task model (e.g. `bert.` prefixed) applied to its bare backbone, or vice versa;
        # a key without its layer prefix (e.g. `q_proj.weight`) fits many tensors and names none of them.
        hits = [c for c in self.base.infos if c.endswith("." + name) or name.endswith("." + c)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            listed = ", ".join(f"'{h}'" for h in hits[:3]) + (f" and {len(hits) - 3} more" if len(hits) > 3 else "")
            raise CheckpointError(f"{self.path}: adapter tensor '{shown}' matches {len(hits)} tensors of the base "
                                  f"{self.base.path} ({listed}); which one is meant is ambiguous")
        raise CheckpointError(f"{self.path}: adapter tensor '{shown}' matches no tensor of the base {self.base.path}")

    def _targeted(self, module: str) -> bool:
        """Whether peft would put a LoRA layer on `module` (peft's check_target_module_exists)."""
        cfg = self.config
        excl = cfg.get("exclude_modules")
        if excl:
            if isinstance(excl, str) and re.fullmatch(excl, module):
                return False
            if not isinstance(excl, str) and (module in excl or any(module.endswith("." + e) for e in excl)):
                return False
        targets = cfg.get("target_modules")
        if targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
            return True  # nothing to check against (all-linear is resolved on the model, which we do not build)
        if isinstance(targets, str):
            return re.fullmatch(targets, module) is not None
        if module in targets:
            return True
        if not any(module.endswith("." + t) for t in targets):
            return False
        layers = cfg.get("layers_to_transform")
        if layers is None or layers == []:
            return True
        patterns = cfg.get("layers_pattern") or None
        if patterns is None:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            m = None
            for pat in [patterns] if isinstance(patterns, str) else patterns:
                m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", module)
                if m:
                    break
        if m is None:
            return False
        idx = int(m.group("idx"))
        return idx == layers if isinstance(layers, int) else idx in layers

    def _parse(self) -> None:
        cfg = self.config
        r_default, alpha_default = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
        rslora, fan_in_fan_out = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))
        pairs: dict[str, dict[str, TensorInfo]] = {}
        lora_biases: dict[str, TensorInfo] = {}
        for key, info in self.file.tensors.items():
            m = re.match(r"^(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.[^.]+)?\.weight$", key) or re.match(
                r"^(.*)\.(lora_embedding_A|lora_embedding_B)(\.[^.]+)?$", key
            )
            mb = re.match(r"^(.*)\.lora_B(\.[^.]+)?\.bias$", key)
            if m:
                pairs.setdefault(m.group(1), {})[m.group(2)] = info
            elif mb:  # lora_bias=True
                lora_biases[mb.group(1)] = info
            elif "lora_" in key or "magnitude" in key:
                raise CheckpointError(f"{self.path}: unsupported adapter tensor '{key}'")
            elif key.endswith(".base_layer.bias"):  # bias="lora_only"/"all": the trained bias of an adapted module
                self.replaced[self._base_name(key[: -len(".base_layer.bias")] + ".bias", key)] = info
            elif ".base_layer." in key:
                raise CheckpointError(f"{self.path}: unsupported adapter tensor '{key}' (only a base layer's bias is merged)")
            else:
                self.replaced[self._base_name(key)] = info
        for module_key, parts in pairs.items():
            embedding = "lora_embedding_A" in parts
            a = parts.get("lora_embedding_A" if embedding else "lora_A")
            b = parts.get("lora_embedding_B" if embedding else "lora_B")
            if a is None or b is None:
                raise CheckpointError(f"{self.path}: '{module_key}' has only one of its LoRA A/B factors")
            module = module_key[len(PREFIX):] if module_key.startswith(PREFIX) else module_key
            if not self._targeted(module):
                raise CheckpointError(f"{self.path}: LoRA factors for '{module}', which target_modules "
                                      f"{cfg.get('target_modules')!r} does not select (peft would skip them)")
            r = int(_pattern_value(cfg.get("rank_pattern") or {}, module, r_default))
            alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha_default))
            if a.shape[0] != r or b.shape[1] != r:
                raise CheckpointError(f"{self.path}: '{module_key}' factors have rank {a.shape[0]}, config says r={r}")
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            target = self._base_name(module_key + ".weight", a.name)
            transpose = embedding or fan_in_fan_out
            shape = self.base.infos[target].shape
            want = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
            if tuple(shape) != want:
                raise CheckpointError(f"{self.path}: ΔW for '{target}' would be {list(want)}, base has {list(shape)}")
            if target in self.factors:
                raise CheckpointError(f"{self.path}: two LoRA modules of the adapter both adapt '{target}'")
            self.factors[target] = LoraFactor(a, b, scale, transpose, r, alpha)
            if module_key in lora_biases:
                bias = lora_biases.pop(module_key)
                bname = self._base_name(module_key + ".bias", bias.name)
                if tuple(bias.shape) != tuple(self.base.infos[bname].shape):
                    raise CheckpointError(f"{self.path}: '{bias.name}' has shape {list(bias.shape)}, "
                                          f"'{bname}' {list(self.base.infos[bname].shape)}")
                self.bias_deltas[bname] = (bias, scale)
        if lora_biases:
            raise CheckpointError(f"{self.path}: '{next(iter(lora_biases.values())).name}' has no LoRA factors of its module")
        for name, info in self.replaced.items():
            if tuple(info.shape) != tuple(self.base.infos[name].shape):
                raise CheckpointError(f"{self.path}: '{name}' has shape {list(info.shape)}, base has {list(self.base.infos[name].shape)}")

    # -- the source interface (same as Checkpoint) ---------------------------------------
    def delta(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        """ΔW block in fp32 for adapted matrices (and s·lora_B.bias for lora_bias); None for tensors the adapter
        does not add to."""
        f = self.factors.get(name)
        if f is not None:
            return f.delta(self.base.infos[name].shape, start, stop)
        if name in self.bias_deltas:
            info, scale = self.bias_deltas[name]
            return info.file.read(info, start, stop).float() * scale
        return None

    def changes(self, name: str) -> bool:
        """Whether the adapted model's `name` differs from the base's."""
        return name in self.factors or name in self.replaced or name in self.bias_deltas

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self.replaced:
            info = self.replaced[name]
            base = info.file.read(info, start, stop)
        else:
            base = self.base.read(name, start, stop)
        d = self.delta(name, start, stop)
        return base if d is None else base.float() + d

    def release(self, name: str, start: int, stop: int) -> None:
        self.base.release(name, start, stop)

    def file_hashes(self) -> list[dict]:
        return [{"file": str(self.file.path), "bytes": self.file.size, "sha256": self.file.sha256()}]

    def sidecar_files(self) -> list[Path]:
        return []

    @property
    def nbytes(self) -> int:
        return self.file.size

    def load(self, names=None) -> dict[str, torch.Tensor]:
        names = list(self.infos) if names is None else names
        return {n: self.read(n, 0, self.infos[n].numel).clone().reshape(self.infos[n].shape) for n in names}

    def close(self) -> None:
        self.file.close()

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, {len(self.factors)} adapted matrices on {self.base.path})"
