"""Atomic, streaming, HF-sharded safetensors writer.

The layout of every output tensor (name, dtype, shape) is known before any
data is computed, so each shard's header is written first and tensor data is
then appended block by block, in layout order: no output tensor is ever held
whole in memory. Everything goes to a temporary directory next to the target,
renamed into place by `commit()`; any failure (including a full disk) removes
the temporary directory, so a failed run leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightops.errors import OutputError
from weightops.io.checkpoint import INDEX_NAME, SINGLE_NAME
from weightops.io.safetensors_file import DTYPE_NAMES, _background


@dataclass
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    shard: int = 0
    offset: int = 0  # within the shard's data section
    written: int = 0
    sha: "hashlib._Hash" = field(default_factory=hashlib.sha256)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for u, mult in units.items():
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise OutputError(f"cannot read size '{text}' (use e.g. 5GB, 500MB, 2GiB)") from None


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _disk_error(e: OSError, where: Path) -> OutputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"no space left on device while writing {where}; nothing was left behind")
    return OutputError(f"cannot write {where}: {e.strerror or e}")


class CheckpointWriter:
    """Write tensors (in the given layout order) to `out_dir`, atomically."""

    def __init__(self, out_dir, layout, *, shard_size="5GB", metadata=None, force=False, file_name=SINGLE_NAME):
        self.out_dir = Path(out_dir)
        self.file_name = file_name  # the name of an unsharded output (patches and adapters use their own)
        if self.out_dir.exists() and not force:
            raise OutputError(f"{self.out_dir} exists; pass --force to replace it")
        self.force = force
        self.shard_size = parse_size(shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.entries = [_Entry(n, d, tuple(s), _nbytes(d, s)) for n, d, s in layout]
        self._by_name = {e.name: e for e in self.entries}
        self._assign_shards()
        self.total_bytes = sum(e.nbytes for e in self.entries)
        parent = self.out_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(parent).free
        if free < self.total_bytes:
            raise OutputError(
                f"not enough disk space in {parent}: the output needs {self.total_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
            )
        self.tmp = parent / f".{self.out_dir.name}.weightops-tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self._cursor = 0  # index of the entry being written
        self._fh = None
        self._open_shard = -1
        self._done = False

    def _assign_shards(self) -> None:
        shard, used = 0, 0
        for e in self.entries:
            if used and used + e.nbytes > self.shard_size:
                shard, used = shard + 1, 0
            e.shard, e.offset = shard, used
            used += e.nbytes
        self.n_shards = shard + 1 if self.entries else 1

    def shard_name(self, i: int) -> str:
        if self.n_shards == 1:
            return self.file_name
        return f"model-{i + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def _header(self, shard: int) -> bytes:
        h: dict = {"__metadata__": self.metadata}
        for e in self.entries:
            if e.shard == shard:
                h[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [e.offset, e.offset + e.nbytes]}
        raw = json.dumps(h, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as the reference writer does
        return len(raw).to_bytes(8, "little") + raw

    def _switch_to(self, shard: int) -> None:
        if self._fh is not None:
            self._fh.close()
        path = self.tmp / self.shard_name(shard)
        self._fh = open(path, "wb")
        self._fh.write(self._header(shard))
        self._open_shard = shard

    def write(self, name: str, block: torch.Tensor) -> None:
        """Append the next block of elements of tensor `name` (flat, contiguous)."""
        e = self.entries[self._cursor] if self._cursor < len(self.entries) else None
        if e is None or e.name != name:
            raise RuntimeError(f"writer expected tensor {e.name if e else '<none>'}, got {name}")
        if block.dtype != e.dtype:
            raise RuntimeError(f"{name}: block dtype {block.dtype} != layout dtype {e.dtype}")
        try:
            if self._open_shard != e.shard:
                self._switch_to(e.shard)
            data = block.contiguous().view(-1)
            mv = memoryview(data.view(torch.uint8).numpy()) if data.numel() else memoryview(b"")
            self._fh.write(mv)
        except OSError as err:
            self.abort()
            raise _disk_error(err, self.out_dir) from None
        sha = e.sha
        _background().submit(lambda: sha.update(mv))  # mv keeps the block alive until hashed
        e.written += len(mv)
        if e.written > e.nbytes:
            raise RuntimeError(f"{name}: wrote {e.written} bytes, layout has {e.nbytes}")
        if e.written == e.nbytes:
            self._cursor += 1
            self._skip_empty()

    def _skip_empty(self) -> None:
        # zero-size tensors need no data; keep the cursor on the next real one
        while self._cursor < len(self.entries) and self.entries[self._cursor].nbytes == 0:
            e = self.entries[self._cursor]
            if self._open_shard != e.shard:
                self._switch_to(e.shard)
            self._cursor += 1

    def tensor_sha256(self) -> dict[str, str]:
        _background().flush()
        return {e.name: e.sha.hexdigest() for e in self.entries}

    def add_file(self, src: Path) -> None:
        try:
            shutil.copy2(src, self.tmp / src.name)
        except OSError as err:
            self.abort()
            raise _disk_error(err, self.out_dir) from None

    def add_text(self, name: str, text: str) -> None:
        try:
            (self.tmp / name).write_text(text)
        except OSError as err:
            self.abort()
            raise _disk_error(err, self.out_dir) from None

    def add_json(self, name: str, obj) -> None:
        try:
            (self.tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
        except OSError as err:
            self.abort()
            raise _disk_error(err, self.out_dir) from None

    def commit(self) -> Path:
        self._skip_empty()
        if self._cursor != len(self.entries):
            missing = self.entries[self._cursor].name
            self.abort()
            raise RuntimeError(f"output incomplete: tensor {missing} was not fully written")
        try:
            if self._fh is None:  # a checkpoint with no tensors at all
                self._switch_to(0)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
            for i in range(self.n_shards):
                if not (self.tmp / self.shard_name(i)).exists():
                    (self.tmp / self.shard_name(i)).write_bytes(self._header(i))
            if self.n_shards > 1:
                weight_map = {e.name: self.shard_name(e.shard) for e in self.entries}
                index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
                (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            if self.out_dir.exists():  # --force: swap the old one out only now that the new one is whole
                old = self.out_dir.parent / f".{self.out_dir.name}.weightops-old-{os.getpid()}"
                os.rename(self.out_dir, old)
                os.rename(self.tmp, self.out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(self.tmp, self.out_dir)
        except OSError as err:
            self.abort()
            raise _disk_error(err, self.out_dir) from None
        self._done = True
        return self.out_dir

    def abort(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None
        if not self._done and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


@contextlib.contextmanager
def atomic_dir(out, force: bool = False):
    """A directory of reports/plots built in a temporary sibling and renamed to `out` only when the
    block completes (an existing `out` is replaced only then, and only with force); on error nothing is left."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.weightops-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.weightops-old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as e:
        raise _disk_error(e, out) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
