"""The patch directory: `patch.safetensors` (tensors) + `patch.json` (what they mean).

A patch holds, per target tensor of the source base θv1, one entry:
- `lowrank`: ΔW = scale · B @ A, stored as `<name>.lora_A` [r, in] and
  `<name>.lora_B` [out, r] exactly as PEFT keeps them (transposed for
  embeddings and fan_in_fan_out layers, like `weightops.io.adapter`);
- `dense`: ΔW itself, `<name>.delta`, for tensors that are not matrices
  (biases, norms) or that the user asked to keep dense;
- `value`: a tensor that REPLACES the target's (`<name>.value`), as PEFT's
  `modules_to_save` does for a classifier head.

`patch.json` is self-describing: the source base's fingerprint (shape, dtype
and sha256 of every tensor, so a check can tell which base a patch came from),
per-entry rank/alpha/scale/scaling rule, provenance, the sha256 of every stored
tensor, and `meta_sha256`, a checksum of the JSON itself. `Patch(path)` refuses a
patch whose tensors or metadata do not match their checksums.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightops.errors import CheckpointError
from weightops.io.adapter import LoraFactor
from weightops.io.safetensors_file import SafetensorsFile, TensorInfo

FORMAT = "weightops-patch"
FORMAT_VERSION = 1
TENSORS_FILE = "patch.safetensors"
META_FILE = "patch.json"
KINDS = ("lowrank", "dense", "value")
# Blocks of this many elements when hashing whole checkpoints (16 MB in fp32).
HASH_BLOCK = 1 << 22


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_sha256(src, name: str) -> str:
    """sha256 of a tensor's raw bytes, read block by block (pages released as we go)."""
    h = hashlib.sha256()
    numel = src.infos[name].numel
    for start in range(0, numel, HASH_BLOCK):
        stop = min(numel, start + HASH_BLOCK)
        h.update(raw_bytes(src.read(name, start, stop)))
        src.release(name, start, stop)
    return h.hexdigest()


def raw_bytes(x: torch.Tensor):
    """A tensor's bytes as they are on disk (for hashing)."""
    return x.contiguous().view(torch.uint8).numpy()


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def meta_checksum(meta: dict) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in meta.items() if k != "meta_sha256"})).hexdigest()


def fingerprint_digest(tensors: dict) -> str:
    """One id for a whole base: sha256 over its per-tensor (name, shape, dtype, sha256) table."""
    return hashlib.sha256(_canonical(tensors)).hexdigest()


@dataclass
class PatchEntry:
    """One target tensor of the patch (the fields of patch.json's `entries`)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str  # the source base's dtype of this tensor
    rank: int | None = None
    alpha: float | None = None
    scale: float = 1.0
    scaling: str | None = None  # "alpha/r", "alpha/sqrt(r)" (rsLoRA) or "svd" (scale 1, singular values in B)
    layout: str = "linear"  # linear | embedding | fan_in_fan_out (the last two store ΔWᵀ's factors)
    energy: float | None = None  # SVD: captured fraction of ‖δ‖²
    rel_error: float | None = None  # SVD: ‖δ − ΔW‖_F / ‖δ‖_F
    extra: dict = field(default_factory=dict)

    @property
    def keys(self) -> tuple[str, ...]:
        """The tensors of patch.safetensors this entry owns."""
        if self.kind == "lowrank":
            return (self.name + ".lora_A", self.name + ".lora_B")
        return (self.name + (".delta" if self.kind == "dense" else ".value"),)

    def to_json(self) -> dict:
        out = {"kind": self.kind, "shape": list(self.shape), "dtype": self.dtype}
        if self.kind == "lowrank":
            out.update(rank=self.rank, alpha=self.alpha, scale=self.scale, scaling=self.scaling, layout=self.layout)
        for k in ("energy", "rel_error"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, name: str, d: dict) -> "PatchEntry":
        known = {"kind", "shape", "dtype", "rank", "alpha", "scale", "scaling", "layout", "energy", "rel_error"}
        if d.get("kind") not in KINDS:
            raise CheckpointError(f"patch entry '{name}' has unknown kind {d.get('kind')!r}")
        return cls(name=name, kind=d["kind"], shape=tuple(d["shape"]), dtype=d["dtype"], rank=d.get("rank"),
                   alpha=d.get("alpha"), scale=float(d.get("scale", 1.0)), scaling=d.get("scaling"),
                   layout=d.get("layout", "linear"), energy=d.get("energy"), rel_error=d.get("rel_error"),
                   extra={k: v for k, v in d.items() if k not in known})


class Patch:
    """A patch directory, validated and checksum-verified on open."""

    def __init__(self, path):
        self.path = Path(path)
        meta_path, tensors_path = self.path / META_FILE, self.path / TENSORS_FILE
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a patch directory (create one with `weightops patch create`)")
        if not meta_path.is_file() or not tensors_path.is_file():
            missing = META_FILE if not meta_path.is_file() else TENSORS_FILE
            raise CheckpointError(f"{self.path}: {missing} is missing; not a weightops patch")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{meta_path}: unreadable ({e.__class__.__name__})") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_path}: not a weightops patch (format is not '{FORMAT}')")
        if self.meta.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{meta_path}: format version {self.meta['format_version']} is newer than this "
                                  f"weightops reads ({FORMAT_VERSION}); upgrade weightops")
        if self.meta.get("meta_sha256") != meta_checksum(self.meta):
            raise CheckpointError(f"{meta_path}: checksum mismatch (the metadata was modified or is corrupt); re-create the patch")
        try:
            self.entries = {n: PatchEntry.from_json(n, d) for n, d in self.meta["entries"].items()}
            self.fingerprint: dict = self.meta["base_fingerprint"]
            sums: dict = self.meta["tensor_sha256"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{meta_path}: incomplete patch metadata ({e.__class__.__name__}: {e})") from None
        self.file = SafetensorsFile(tensors_path)
        self._verify(sums)

    def _verify(self, sums: dict) -> None:
        tensors = self.file.tensors
        want = [k for e in self.entries.values() for k in e.keys]
        if sorted(want) != sorted(tensors) or sorted(sums) != sorted(tensors):
            odd = sorted(set(want) ^ set(tensors) | set(sums) ^ set(tensors))
            raise CheckpointError(f"{self.path / TENSORS_FILE}: tensors do not match {META_FILE} (e.g. '{odd[0]}'); "
                                  "the patch is corrupt or was modified")
        for key, info in tensors.items():
            if self._sha(info) != sums[key]:
                raise CheckpointError(f"{self.path / TENSORS_FILE}: tensor '{key}' fails its sha256 check; "
                                      "the patch is corrupt or was modified, re-create it")
        for e in self.entries.values():
            self._check_entry(e)

    def _sha(self, info: TensorInfo) -> str:
        return hashlib.sha256(raw_bytes(self.file.read(info, 0, info.numel))).hexdigest()

    def _check_entry(self, e: PatchEntry) -> None:
        t = self.file.tensors
        if e.kind == "lowrank":
            a, b = t[e.keys[0]].shape, t[e.keys[1]].shape
            want = tuple(reversed(e.shape)) if e.layout != "linear" else tuple(e.shape)
            if len(want) != 2 or len(a) != 2 or len(b) != 2 or a[0] != b[1] or (b[0], a[1]) != want:
                raise CheckpointError(f"{self.path}: factors of '{e.name}' ({list(b)} @ {list(a)}) do not make {list(e.shape)}")
        elif tuple(t[e.keys[0]].shape) != tuple(e.shape):
            raise CheckpointError(f"{self.path}: '{e.keys[0]}' is {list(t[e.keys[0]].shape)}, entry says {list(e.shape)}")

    # -- reading -------------------------------------------------------------------
    def factor(self, e: PatchEntry, times: float = 1.0) -> LoraFactor:
        t = self.file.tensors
        return LoraFactor(t[e.keys[0]], t[e.keys[1]], e.scale * times, e.layout != "linear", e.rank, e.alpha)

    def delta(self, e: PatchEntry, start: int, stop: int, times: float = 1.0) -> torch.Tensor:
        """Flat elements [start, stop) of times·ΔW in fp32 (lowrank: only the rows the block covers)."""
        if e.kind == "lowrank":
            return self.factor(e, times).delta(e.shape, start, stop)
        if e.kind == "dense":
            info = self.file.tensors[e.keys[0]]
            d = self.file.read(info, start, stop).float()
            return d if times == 1.0 else d * times
        raise ValueError(f"'{e.name}' is a value entry: it has no delta")

    def value(self, e: PatchEntry, start: int, stop: int) -> torch.Tensor:
        return self.file.read(self.file.tensors[e.keys[0]], start, stop)

    def tensor(self, key: str) -> torch.Tensor:
        info = self.file.tensors[key]
        return self.file.read(info, 0, info.numel).reshape(info.shape)

    def norm(self, e: PatchEntry) -> float:
        """‖ΔW‖_F (value entries: ‖value‖_F); low-rank via the r×r Gram matrices, never forming B @ A."""
        if e.kind == "lowrank":
            a, b = self.tensor(e.keys[0]).double(), self.tensor(e.keys[1]).double()
            sq = float(torch.trace((b.T @ b) @ (a @ a.T)))
            return abs(e.scale) * max(sq, 0.0) ** 0.5
        return float(self.tensor(e.keys[0]).double().norm())

    @property
    def fingerprint_sha256(self) -> str:
        return self.fingerprint.get("sha256", "")

    def close(self) -> None:
        self.file.close()

    def __repr__(self) -> str:
        kinds = {k: sum(e.kind == k for e in self.entries.values()) for k in KINDS}
        return f"Patch({str(self.path)!r}, " + ", ".join(f"{v} {k}" for k, v in kinds.items() if v) + ")"


def write_patch(out, entries: list[PatchEntry], tensors: dict[str, torch.Tensor], *, fingerprint: dict,
                source: dict, provenance: dict, force: bool = False) -> Path:
    """Write a patch directory atomically (the model writer, with patch.safetensors as its one file)."""
    from weightops.io.writer import CheckpointWriter

    layout = [(k, tensors[k].dtype, tuple(tensors[k].shape)) for e in entries for k in e.keys]
    with CheckpointWriter(out, layout, shard_size=1 << 62, file_name=TENSORS_FILE, force=force,
                          metadata={"format": "pt", "weightops_patch": str(FORMAT_VERSION)}) as w:
        for k, _, _ in layout:
            w.write(k, tensors[k].contiguous().reshape(-1))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source": source,
            "provenance": provenance,
            "summary": summarize(entries),
            "entries": {e.name: e.to_json() for e in entries},
            "base_fingerprint": fingerprint,
            "tensor_sha256": w.tensor_sha256(),
        }
        meta["meta_sha256"] = meta_checksum(meta)
        w.add_json(META_FILE, meta)
        return w.commit()


def summarize(entries: list[PatchEntry]) -> dict:
    low = [e for e in entries if e.kind == "lowrank"]
    ranks = sorted({e.rank for e in low})
    return {
        "targets": len(entries),
        "by_kind": {k: sum(e.kind == k for e in entries) for k in KINDS},
        "ranks": ranks,
        "alphas": sorted({e.alpha for e in low}),
        "scaling": sorted({e.scaling for e in low}),
    }


def fingerprint(ck, progress=None) -> dict:
    """Shape, dtype and content sha256 of every tensor of a checkpoint, plus one digest of them all."""
    tensors = {}
    for name, info in ck.infos.items():
        tensors[name] = {"shape": list(info.shape), "dtype": dtype_name(info.dtype), "sha256": tensor_sha256(ck, name)}
        if progress is not None:
            progress(info.nbytes)
    return {"tensors": tensors, "sha256": fingerprint_digest(tensors)}
