"""Masks and sparse deltas on disk: per tensor, sorted flat indices (+ values).

A sparse file is a directory (written atomically, like a model):

    <dir>/sparse.safetensors   "<name>.indices": sorted, unique, row-major flat
                               indices in the smallest signed int dtype that
                               holds numel - 1 (int16 / int32 / int64);
                               "<name>.values" (deltas only): the values, in
                               the dtype the writer was given
    <dir>/sparse.json          the manifest: kind ("mask" | "delta"), format
                               version, per-tensor shape / dtype / nnz, totals,
                               sha256 of sparse.safetensors, and whatever the
                               maker adds (sources' fingerprints, method, ...)

A tensor may be stored `dense` (no indices: every element is selected, values
hold all numel elements), e.g. a classification head or a whole-tensor mask.
Tensors listed with nnz 0 are in the file's scope but select nothing; tensors
not listed are out of scope (a mask leaves them at the base, a delta adds 0).
Each safetensors entry is aligned to its item size (data are grouped by item
size, widest first), so every read is a zero-copy view.

Python API (the CLI mirrors it; see docs/grafting.md):
    write_sparse_delta(path, tensors, manifest)   tensors: (name, shape, dtype, flat_indices | None, values)
    write_mask(path, tensors, manifest)           tensors: (name, shape, dtype, flat_indices | None)
    SparseWriter(path, kind, manifest)            the same, chunk by chunk (begin/add/end/commit)
    read_sparse_delta(path) / read_mask(path) / open_sparse(path) -> SparseFile
    SparseFile.indices(name), .values(name), .block(name, start, stop),
              .mask_block(...), .delta_block(...)  per-tensor and per-block access
The apply operations (which write models) live in weightops.sparse.apply.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from weightops.errors import CheckpointError, OutputError, WeightopsError
from weightops.io.safetensors_file import DTYPE_NAMES, DTYPES, FLOAT_DTYPES, SafetensorsFile

FORMAT = "weightops-sparse"
VERSION = 1
DATA_NAME = "sparse.safetensors"
MANIFEST_NAME = "sparse.json"
KINDS = ("mask", "delta")
# Validation reads indices in chunks of this many entries, so RSS stays bounded.
_CHECK_CHUNK = 1 << 22


def index_dtype(numel: int) -> torch.dtype:
    """Smallest signed integer dtype holding every flat index of a numel-element tensor."""
    if numel <= 1 << 15:
        return torch.int16
    if numel <= 1 << 31:
        return torch.int32
    return torch.int64


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _parse_dtype(name: str, where: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"{where}: unknown dtype '{name}' in {MANIFEST_NAME}")
    return dt


@dataclass(frozen=True)
class SparseTensor:
    """One tensor of a sparse file (the manifest entry)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype of the model tensor this entry applies to
    nnz: int
    dense: bool
    value_dtype: torch.dtype | None  # None for masks

    @property
    def numel(self) -> int:
        return _numel(self.shape)


# -- writing ------------------------------------------------------------------------------
class SparseWriter:
    """Write a mask or sparse delta tensor by tensor, each in chunks of sorted indices.

        with SparseWriter(path, "delta", manifest={...}) as w:
            w.begin(name, shape, dtype)          # dense=True: no indices, values cover the tensor
            w.add(indices_chunk, values_chunk)   # any number of chunks, indices ascending overall
            w.end()
            ...
            w.commit()                           # renames the finished directory into place

    Data are spooled to one scratch file per item size and assembled into the
    safetensors file at commit (sparse data are small next to a model), so no
    tensor's indices are ever held whole in memory.
    """

    def __init__(self, path, kind: str, manifest: dict | None = None, *, force: bool = False):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.path, self.kind, self.force = Path(path), kind, force
        if self.path.exists() and not force:
            raise OutputError(f"{self.path} exists; pass --force to replace it")
        self.extra = dict(manifest or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".{self.path.name}.weightops-tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        # one scratch file per (item size, "i"ndices | "v"alues): a tensor's chunks stay contiguous in each
        self._spools: dict[tuple[int, str], object] = {}
        self._spool_len: dict[tuple[int, str], int] = {}
        self._keys: list[tuple[str, torch.dtype, tuple[int, str], int, int]] = []  # (key, dtype, spool, offset, numel)
        self.tensors: dict[str, SparseTensor] = {}
        self._cur: dict | None = None
        self._done = False

    # spooling
    def _spool(self, x: torch.Tensor, role: str) -> int:
        size = (x.element_size(), role)
        f = self._spools.get(size)
        if f is None:
            f = self._spools[size] = open(self.tmp / f"spool{size[0]}{role}", "wb")
            self._spool_len.setdefault(size, 0)
        off = self._spool_len[size]
        if x.numel():
            data = x.contiguous().view(-1)
            raw = data.view(torch.uint8) if data.dtype != torch.bool else data.to(torch.uint8)
            try:
                f.write(memoryview(raw.numpy()))
            except OSError as e:
                self.abort()
                raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from None
        self._spool_len[size] += x.numel() * size[0]
        return off

    def begin(self, name: str, shape, dtype: torch.dtype, *, dense: bool = False,
              value_dtype: torch.dtype | None = None) -> None:
        if self._cur is not None:
            raise RuntimeError(f"begin({name!r}) before end() of {self._cur['name']!r}")
        if name in self.tensors:
            raise WeightopsError(f"sparse file: tensor '{name}' given twice")
        shape = tuple(int(s) for s in shape)
        self._cur = {"name": name, "shape": shape, "dtype": dtype, "dense": dense, "numel": _numel(shape),
                     "idx_dtype": index_dtype(_numel(shape)), "value_dtype": value_dtype, "last": -1, "nnz": 0,
                     "idx_parts": [], "val_parts": []}

    def add(self, indices: torch.Tensor | None, values: torch.Tensor | None = None) -> None:
        """Append entries: indices ascending, above every index added before (None for dense tensors)."""
        c = self._cur
        if c is None:
            raise RuntimeError("add() outside begin()/end()")
        name = c["name"]
        if self.kind == "delta":
            if values is None:
                raise WeightopsError(f"sparse delta: tensor '{name}' needs values")
            values = values.reshape(-1)
            if values.dtype not in FLOAT_DTYPES:
                raise WeightopsError(f"sparse delta: values of '{name}' must be floating point, got {values.dtype}")
            if c["value_dtype"] is None:
                c["value_dtype"] = values.dtype
            elif values.dtype != c["value_dtype"]:
                values = values.to(c["value_dtype"])
            if values.numel() and not bool(torch.isfinite(values).all()):
                raise WeightopsError(f"sparse delta: NaN/Inf among the values of '{name}'")
        elif values is not None:
            raise WeightopsError("a mask has no values")
        if c["dense"]:
            if indices is not None:
                raise WeightopsError(f"sparse file: tensor '{name}' is dense; give indices=None")
            n = values.numel() if values is not None else c["numel"] - c["nnz"]
        else:
            if indices is None:
                raise WeightopsError(f"sparse file: tensor '{name}' needs indices")
            idx = indices.reshape(-1)
            if idx.is_floating_point() or idx.dtype == torch.bool:
                raise WeightopsError(f"sparse file: indices of '{name}' must be integers, got {idx.dtype}")
            n = idx.numel()
            if values is not None and values.numel() != n:
                raise WeightopsError(f"sparse delta: '{name}' has {n} indices but {values.numel()} values")
            if n:
                idx64 = idx.to(torch.int64)
                first, last = int(idx64[0]), int(idx64[-1])
                if first <= c["last"] or (n > 1 and not bool((idx64[1:] > idx64[:-1]).all())):
                    raise WeightopsError(f"sparse file: indices of '{name}' must be strictly increasing")
                if first < 0 or last >= c["numel"]:
                    raise WeightopsError(f"sparse file: index out of range for '{name}' ({c['numel']} elements)")
                c["last"] = last
                c["idx_parts"].append(self._spool(idx64.to(c["idx_dtype"]), "i"))
        if values is not None and values.numel():
            c["val_parts"].append(self._spool(values, "v"))
        c["nnz"] += n

    def end(self) -> None:
        c = self._cur
        if c is None:
            raise RuntimeError("end() without begin()")
        if c["dense"] and self.kind == "mask":
            c["nnz"] = c["numel"]  # a dense mask entry selects the whole tensor; nothing is stored
        if c["dense"] and c["nnz"] != c["numel"]:
            raise WeightopsError(f"sparse file: dense tensor '{c['name']}' got {c['nnz']} of {c['numel']} values")
        vdt = c["value_dtype"] if self.kind == "delta" else None
        if self.kind == "delta" and vdt is None:
            vdt = torch.float32  # an empty delta tensor: no values were ever given
        name, nnz = c["name"], c["nnz"]
        if not c["dense"]:
            key = (torch.empty((), dtype=c["idx_dtype"]).element_size(), "i")
            off = c["idx_parts"][0] if c["idx_parts"] else self._spool_len.setdefault(key, 0)
            self._keys.append((f"{name}.indices", c["idx_dtype"], key, off, nnz))
        if vdt is not None:
            key = (torch.empty((), dtype=vdt).element_size(), "v")
            off = c["val_parts"][0] if c["val_parts"] else self._spool_len.setdefault(key, 0)
            self._keys.append((f"{name}.values", vdt, key, off, nnz))
        self.tensors[name] = SparseTensor(name, c["shape"], c["dtype"], nnz, c["dense"], vdt)
        self._cur = None

    def write_tensor(self, name, shape, dtype, indices, values=None) -> None:
        """One whole tensor at once (indices None: dense)."""
        dense = indices is None
        self.begin(name, shape, dtype, dense=dense, value_dtype=values.dtype if values is not None else None)
        if not (dense and self.kind == "mask"):
            self.add(indices, values)
        self.end()

    def commit(self) -> Path:
        if self._cur is not None:
            raise RuntimeError(f"commit() before end() of {self._cur['name']!r}")
        try:
            for f in self._spools.values():
                f.close()
            # widest item size first: every entry starts at a multiple of its item size
            sizes = sorted(self._spool_len, reverse=True)
            base, pos = {}, 0
            for s in sizes:
                base[s], pos = pos, pos + self._spool_len[s]
            header = {"__metadata__": {"format": FORMAT, "kind": self.kind}}
            for key, dt, spool, off, n in self._keys:
                b = base[spool] + off
                header[key] = {"dtype": DTYPE_NAMES[dt], "shape": [n], "data_offsets": [b, b + n * spool[0]]}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            data_path = self.tmp / DATA_NAME
            sha = hashlib.sha256()
            with open(data_path, "wb") as out:
                for chunk in (len(raw).to_bytes(8, "little"), raw):
                    out.write(chunk)
                    sha.update(chunk)
                for s in sizes:
                    if s not in self._spools:
                        continue  # only empty tensors of this kind: no bytes
                    spool = self.tmp / f"spool{s[0]}{s[1]}"
                    with open(spool, "rb") as f:
                        while True:
                            buf = f.read(1 << 24)
                            if not buf:
                                break
                            out.write(buf)
                            sha.update(buf)
                    os.remove(spool)
                out.flush()
                os.fsync(out.fileno())
            (self.tmp / MANIFEST_NAME).write_text(json.dumps(self._manifest(sha.hexdigest(), data_path.stat().st_size),
                                                             indent=1) + "\n")
            if self.path.exists():  # --force: swap the old one out only now that the new one is whole
                old = self.path.parent / f".{self.path.name}.weightops-old-{os.getpid()}"
                os.rename(self.path, old)
                os.rename(self.tmp, self.path)
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
            else:
                os.rename(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from None
        self._done = True
        return self.path

    def _manifest(self, sha: str, nbytes: int) -> dict:
        from weightops import __version__

        numel = sum(t.numel for t in self.tensors.values())
        nnz = sum(t.nnz for t in self.tensors.values())
        reserved = {
            "format": FORMAT, "version": VERSION, "kind": self.kind, "weightops_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "nnz": nnz, "numel": numel, "density": (nnz / numel) if numel else 0.0,
            "data": {"file": DATA_NAME, "bytes": nbytes, "sha256": sha},
            "tensors": {t.name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype), "nnz": t.nnz,
                                 **({"dense": True} if t.dense else {}),
                                 **({"value_dtype": _dtype_name(t.value_dtype)} if t.value_dtype else {})}
                        for t in self.tensors.values()},
        }
        clash = sorted(set(self.extra) & set(reserved))
        if clash:
            raise WeightopsError(f"sparse manifest: keys {clash} are reserved")
        return {**reserved, **self.extra}

    def abort(self) -> None:
        for f in self._spools.values():
            try:
                f.close()
            except OSError:
                pass
        if not self._done and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not self._done:
            self.abort()
        return False


def write_sparse_delta(path, tensors: Iterable, manifest: dict | None = None, *, force: bool = False) -> Path:
    """Write a sparse delta: `tensors` yields (name, shape, dtype, flat_indices | None, values).

    flat_indices: sorted, unique, row-major, any integer dtype (None: dense,
    values then cover the whole tensor); values: float, stored in their dtype;
    dtype: the dtype of the model tensor the delta applies to.
    """
    with SparseWriter(path, "delta", manifest, force=force) as w:
        for name, shape, dtype, idx, val in tensors:
            w.write_tensor(name, shape, dtype, idx, val)
        return w.commit()


def write_mask(path, tensors: Iterable, manifest: dict | None = None, *, force: bool = False) -> Path:
    """Write a mask: `tensors` yields (name, shape, dtype, flat_indices | None); None selects the whole tensor."""
    with SparseWriter(path, "mask", manifest, force=force) as w:
        for name, shape, dtype, idx in tensors:
            w.write_tensor(name, shape, dtype, idx)
        return w.commit()


# -- reading ------------------------------------------------------------------------------
class SparseFile:
    """A validated mask or sparse delta, read tensor by tensor or block by block."""

    def __init__(self, path, *, verify: bool = True):
        self.path = Path(path)
        where = str(self.path)
        if not self.path.is_dir():
            raise CheckpointError(f"{where}: not a weightops mask or sparse delta (expected a directory with {MANIFEST_NAME})")
        mpath = self.path / MANIFEST_NAME
        if not mpath.is_file():
            raise CheckpointError(f"{where}: no {MANIFEST_NAME}; not a weightops mask or sparse delta")
        try:
            self.manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{mpath}: corrupt manifest ({e.__class__.__name__})") from None
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise CheckpointError(f"{mpath}: not a {FORMAT} manifest")
        if m.get("version") != VERSION:
            raise CheckpointError(f"{mpath}: format version {m.get('version')} is not supported (this weightops reads {VERSION})")
        self.kind = m.get("kind")
        if self.kind not in KINDS:
            raise CheckpointError(f"{mpath}: unknown kind {self.kind!r}")
        self.file = SafetensorsFile(self.path / DATA_NAME)
        data = m.get("data") or {}
        if data.get("bytes") != self.file.size:
            raise CheckpointError(f"{where}: {DATA_NAME} has {self.file.size} bytes, the manifest says {data.get('bytes')} (truncated or replaced)")
        if verify and self.file.sha256() != data.get("sha256"):
            raise CheckpointError(f"{where}: {DATA_NAME} does not match the sha256 in {MANIFEST_NAME} (corrupt)")
        self.tensors: dict[str, SparseTensor] = {}
        try:
            for name, e in m["tensors"].items():
                vdt = _parse_dtype(e["value_dtype"], where) if "value_dtype" in e else None
                self.tensors[name] = SparseTensor(name, tuple(int(s) for s in e["shape"]), _parse_dtype(e["dtype"], where),
                                                  int(e["nnz"]), bool(e.get("dense", False)), vdt)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CheckpointError(f"{mpath}: corrupt tensor table") from None
        self._check_layout()
        if verify:
            self._check_indices()

    def _check_layout(self) -> None:
        where = str(self.path)
        expected = set()
        for t in self.tensors.values():
            if t.nnz < 0 or t.nnz > t.numel or (t.dense and t.nnz != t.numel):
                raise CheckpointError(f"{where}: tensor '{t.name}' claims {t.nnz} entries of {t.numel}")
            if not t.dense:
                info = self.file.tensors.get(f"{t.name}.indices")
                if info is None or info.dtype not in (torch.int16, torch.int32, torch.int64) or info.shape != (t.nnz,):
                    raise CheckpointError(f"{where}: indices of '{t.name}' are missing or malformed")
                expected.add(info.name)
            if self.kind == "delta":
                info = self.file.tensors.get(f"{t.name}.values")
                if info is None or info.dtype != t.value_dtype or info.shape != (t.nnz,):
                    raise CheckpointError(f"{where}: values of '{t.name}' are missing or malformed")
                expected.add(info.name)
        extra = set(self.file.tensors) - expected
        if extra:
            raise CheckpointError(f"{where}: {DATA_NAME} holds '{sorted(extra)[0]}', which the manifest does not list")

    def _check_indices(self) -> None:
        for t in self.tensors.values():
            if t.dense or t.nnz == 0:
                continue
            info = self.file.tensors[f"{t.name}.indices"]
            prev = -1
            for s in range(0, t.nnz, _CHECK_CHUNK):
                e = min(t.nnz, s + _CHECK_CHUNK)
                idx = self.file.read(info, s, e).to(torch.int64)
                if int(idx[0]) <= prev or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())) \
                        or int(idx[0]) < 0 or int(idx[-1]) >= t.numel:
                    raise CheckpointError(f"{self.path}: indices of '{t.name}' are not sorted, unique and in range (corrupt)")
                prev = int(idx[-1])
                self.file.release(info, s, e)

    # -- access ---------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return sum(t.nnz for t in self.tensors.values())

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def indices(self, name: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Flat indices (int64) of entries lo..hi of tensor `name` (all by default)."""
        t = self.tensors[name]
        hi = t.nnz if hi is None else hi
        if t.dense:
            return torch.arange(lo, hi, dtype=torch.int64)
        return self.file.read(self.file.tensors[f"{name}.indices"], lo, hi).to(torch.int64)

    def values(self, name: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Values (stored dtype, zero-copy) of entries lo..hi of tensor `name` (deltas only)."""
        if self.kind != "delta":
            raise WeightopsError(f"{self.path} is a mask; it has no values")
        t = self.tensors[name]
        return self.file.read(self.file.tensors[f"{name}.values"], lo, t.nnz if hi is None else hi)

    def entry_range(self, name: str, start: int, stop: int) -> tuple[int, int]:
        """Entries lo..hi of `name` whose flat index lies in [start, stop) (binary search on the mapping)."""
        t = self.tensors[name]
        start, stop = max(0, start), min(t.numel, stop)
        if start >= stop or t.nnz == 0:
            return 0, 0
        if t.dense:
            return start, stop
        idx = self.file.read(self.file.tensors[f"{name}.indices"], 0, t.nnz)

        def first_at_or_after(x: int) -> int:  # x < numel, so it fits the index dtype
            return t.nnz if x >= t.numel else int(torch.searchsorted(idx, torch.tensor([x], dtype=idx.dtype)))
        return first_at_or_after(start), first_at_or_after(stop)

    def block(self, name: str, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Entries inside elements [start, stop): (positions relative to start, int64; values or None)."""
        lo, hi = self.entry_range(name, start, stop)
        pos = self.indices(name, lo, hi) - start
        return pos, (self.values(name, lo, hi) if self.kind == "delta" else None)

    def mask_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        """bool[stop - start]: which elements of the block are selected (all False if `name` is not listed)."""
        out = torch.zeros(stop - start, dtype=torch.bool)
        if name in self.tensors:
            pos, _ = self.block(name, start, stop)
            out[pos] = True
        return out

    def delta_block(self, name: str, start: int, stop: int, dtype=torch.float32) -> torch.Tensor:
        """Dense block of the delta over elements [start, stop) (zeros elsewhere and for unlisted tensors)."""
        out = torch.zeros(stop - start, dtype=dtype)
        if name in self.tensors:
            pos, val = self.block(name, start, stop)
            if val is None:
                raise WeightopsError(f"{self.path} is a mask; it has no values")
            out[pos] = val.to(dtype)
        return out

    def release(self, name: str) -> None:
        """Drop the pages of one tensor's entries (call when done with it, as for checkpoints)."""
        for key in (f"{name}.indices", f"{name}.values"):
            info = self.file.tensors.get(key)
            if info is not None:
                self.file.release(info, 0, info.shape[0])

    def iter_entries(self, name: str, chunk: int = _CHECK_CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(int64 flat indices, values or None) of `name`, `chunk` entries at a time."""
        t = self.tensors[name]
        for lo in range(0, t.nnz, chunk):
            hi = min(t.nnz, lo + chunk)
            yield self.indices(name, lo, hi), (self.values(name, lo, hi) if self.kind == "delta" else None)

    def sha256(self) -> str:
        return self.manifest["data"]["sha256"]

    def close(self) -> None:
        self.file.close()

    def __repr__(self) -> str:
        return f"SparseFile({str(self.path)!r}, {self.kind}, {len(self.tensors)} tensors, nnz {self.nnz})"


def open_sparse(path, *, verify: bool = True) -> SparseFile:
    """Open a mask or a sparse delta (validated: manifest, layout, sha256, sorted in-range indices)."""
    return SparseFile(path, verify=verify)


def read_sparse_delta(path, *, verify: bool = True) -> SparseFile:
    f = SparseFile(path, verify=verify)
    if f.kind != "delta":
        raise WeightopsError(f"{path} is a {f.kind}, not a sparse delta")
    return f


def read_mask(path, *, verify: bool = True) -> SparseFile:
    """A mask; a sparse delta is accepted too (its support is the mask)."""
    return SparseFile(path, verify=verify)


def check_against(sparse: SparseFile, infos: dict, where: str) -> None:
    """Refuse a sparse file whose tensors are not in `infos` (a Checkpoint's) with the same shape."""
    from weightops.errors import AlignmentError

    for t in sparse.tensors.values():
        info = infos.get(t.name)
        if info is None:
            raise AlignmentError(f"{sparse.path} has tensor '{t.name}', which {where} lacks (made for another model?)")
        if tuple(info.shape) != t.shape:
            raise AlignmentError(f"{sparse.path}: tensor '{t.name}' is {list(t.shape)} there but {list(info.shape)} in {where}")
