"""Checkpoints as sources of tensors, read a flat block of elements at a time.

A `Checkpoint` is an HF model directory (`model.safetensors`, or shards with
`model.safetensors.index.json`) or a single `.safetensors` file. `open_source`
also accepts a PEFT LoRA adapter directory, given the base it was trained on
(see `weightops.io.adapter`). Every source answers the same four questions:
which tensors (`infos`), read elements [start, stop) of one (`read`), forget
them (`release`), and the sha256 of the files behind it (`file_hashes`).

Block-scaled FP8 weights (`weightops.io.fp8`) appear in `infos` as one float
tensor read in fp32, their `*_scale_inv` tensors hidden; `raw_infos` lists the
tensors as stored, and `unknown_fp8` the FP8 tensors whose convention we do not
know (commands refuse them by name).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from weightops.errors import CheckpointError
from weightops.io.fp8 import FP8_DTYPES, QUANT_CONFIG, SCALE_SUFFIX, BlockScaledInfo, find_block_scaled
from weightops.io.safetensors_file import SafetensorsFile, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files copied next to merged weights so the output loads with transformers unchanged.
SIDECAR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "preprocessor_config.json",
)


def _pickle_error(path: Path, found: list[Path]) -> CheckpointError:
    names = ", ".join(p.name for p in found[:3])
    return CheckpointError(
        f"{path}: only pickled weights found ({names}); weightops never unpickles files. Convert once with "
        f"transformers: AutoModel.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
    )


class Checkpoint:
    """A model directory or a single safetensors file."""

    kind = "checkpoint"

    def __init__(self, path: str | os.PathLike):
        self.path = _local(path)
        self.files = [SafetensorsFile(f) for f in self._resolve_files()]
        self.infos: dict[str, TensorInfo] = {}
        for f in self.files:
            for name, info in f.tensors.items():
                if name in self.infos:
                    raise CheckpointError(f"{self.path}: tensor '{name}' appears in two shards")
                self.infos[name] = info
        self._check_index()
        self.raw_infos: dict[str, TensorInfo] = dict(self.infos)
        self.block_scaled, self.unknown_fp8 = find_block_scaled(self.infos, self.config)
        if self.block_scaled:
            hidden = {n + SCALE_SUFFIX for n in self.block_scaled}
            self.infos = {n: self.block_scaled.get(n, i) for n, i in self.infos.items() if n not in hidden}

    @property
    def config(self) -> dict:
        """config.json of a model directory ({} when there is none or it is unreadable)."""
        if not hasattr(self, "_config"):
            self._config = {}
            f = self.path / "config.json"
            if self.path.is_dir() and f.is_file():
                try:
                    cfg = json.loads(f.read_text())
                    self._config = cfg if isinstance(cfg, dict) else {}
                except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                    pass
        return self._config

    def _resolve_files(self) -> list[Path]:
        p = self.path
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or directory")
        if p.is_file():
            if p.suffix in PICKLE_SUFFIXES:
                raise _pickle_error(p, [p])
            if p.suffix != ".safetensors":
                raise CheckpointError(f"{p}: not a checkpoint (expected a .safetensors file or a model directory)")
            return [p]
        index = p / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: corrupt index ({e.__class__.__name__})") from None
            self._weight_map = weight_map
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (p / s).is_file()]
            if missing:
                raise CheckpointError(f"{p}: shard {missing[0]} listed in {INDEX_NAME} is missing")
            return [p / s for s in shards]
        if (p / SINGLE_NAME).is_file():
            return [p / SINGLE_NAME]
        candidates = sorted(p.glob("*.safetensors"))
        if (p / ADAPTER_CONFIG).is_file():
            raise CheckpointError(f"{p}: this is a PEFT adapter; give the model it was trained on as --base")
        if len(candidates) == 1:
            return candidates
        pickled = [f for f in sorted(p.iterdir()) if f.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise _pickle_error(p, pickled)
        if candidates:
            raise CheckpointError(f"{p}: several .safetensors files but no {INDEX_NAME}")
        raise CheckpointError(f"{p}: not a checkpoint (no {SINGLE_NAME}, {INDEX_NAME} or {ADAPTER_CONFIG})")

    def _check_index(self) -> None:
        weight_map = getattr(self, "_weight_map", None)
        if weight_map is None:
            return
        for name, shard in weight_map.items():
            info = self.infos.get(name)
            if info is None or info.file.path.name != shard:
                raise CheckpointError(f"{self.path}: {INDEX_NAME} places '{name}' in {shard}, which does not hold it")
        extra = set(self.infos) - set(weight_map)
        if extra:
            raise CheckpointError(f"{self.path}: tensor '{sorted(extra)[0]}' is in a shard but not in {INDEX_NAME}")

    # -- the source interface ---------------------------------------------------------
    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        info = self.infos[name]
        if isinstance(info, BlockScaledInfo):
            return info.read(start, stop)
        return info.file.read(info, start, stop)

    def release(self, name: str, start: int, stop: int) -> None:
        info = self.infos[name]
        if isinstance(info, BlockScaledInfo):
            return info.release(start, stop)
        info.file.release(info, start, stop)

    def file_hashes(self) -> list[dict]:
        return [{"file": str(f.path), "bytes": f.size, "sha256": f.sha256()} for f in self.files]

    def sidecar_files(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        return [self.path / n for n in SIDECAR_FILES if (self.path / n).is_file()]

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)

    def load(self, names=None) -> dict[str, torch.Tensor]:
        """Whole tensors (copies), for tests and small models only."""
        names = list(self.infos) if names is None else names
        return {n: self.read(n, 0, self.infos[n].numel).clone().reshape(self.infos[n].shape) for n in names}

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.infos)} tensors)"


def _local(path) -> Path:
    """The path itself, or for a hub id `org/name[@revision]` its snapshot in the HF cache (weightops.hub)."""
    from weightops import hub

    return hub.resolve(path) if hub.looks_like_hub_id(path) else Path(path)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    try:
        p = _local(path)
    except CheckpointError:  # an unresolvable hub id: whoever opens it reports why
        return False
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def open_source(path: str | os.PathLike, base: Checkpoint | None = None):
    """A checkpoint, or a LoRA adapter applied on `base` (either may be a hub id)."""
    path = _local(path)
    if is_adapter_dir(path):
        from weightops.io.adapter import LoraAdapter

        if base is None:
            raise CheckpointError(f"{path}: a LoRA adapter needs --base (the model it was trained on)")
        return LoraAdapter(path, base)
    return Checkpoint(path)


def output_config(path: Path | dict, written: dict, fp8_block) -> dict | None:
    """The template's config.json (a path, or the dict a planner built, e.g. a mergekit config's with its layer
    count) for an output: the dtype written (`torch_dtype`, and `dtype` as transformers 5 writes and prefers
    it) set to the dtype of most of the non-FP8 float elements (`written`: dtype → elements), also in
    sub-configs that carry one; an fp8 quantization_config kept (or added) only when FP8 weights were written
    (`fp8_block`), dropped otherwise. None: unreadable, copy the file as it is."""
    if isinstance(path, dict):
        cfg = json.loads(json.dumps(path))  # a deep copy: the caller's dict stays as it was
    else:
        try:
            cfg = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
    if not isinstance(cfg, dict):
        return None
    sizes = {d: n for d, n in written.items() if d.is_floating_point and d not in FP8_DTYPES}
    if sizes:
        main = str(max(sizes, key=lambda d: sizes[d]))[6:]
        cfg["torch_dtype"] = cfg["dtype"] = main
        for sub in cfg.values():  # composite models (text_config, vision_config, ...) carry their own
            if isinstance(sub, dict):
                for key in ("torch_dtype", "dtype"):
                    if key in sub:
                        sub[key] = main
    qc = cfg.get("quantization_config")
    if fp8_block is not None:
        if not (isinstance(qc, dict) and qc.get("quant_method") == "fp8"):
            cfg["quantization_config"] = {**QUANT_CONFIG, "weight_block_size": list(fp8_block)}
    elif isinstance(qc, dict) and qc.get("quant_method") == "fp8":
        del cfg["quantization_config"]
    return cfg
