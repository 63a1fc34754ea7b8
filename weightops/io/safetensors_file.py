"""One safetensors file, memory-mapped, read a block of elements at a time.

We parse the header ourselves (8-byte little-endian length + JSON) instead of
going through `safe_open` so that we can (1) validate the file up front with
errors that name the problem, (2) hand out zero-copy views of any flat element
range of a tensor, (3) hash the exact bytes we stream (the sha256 of the whole
file comes out of one streaming pass) and (4) drop pages we are done with
(`madvise(MADV_DONTNEED)`), so that peak RSS is bounded by the block size and
not by the model size: touched pages of a mapping count in RSS.
"""
from __future__ import annotations

import math
import hashlib
import json
import mmap
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from weightops.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# A header larger than this is not a real checkpoint but a corrupt length field.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_PAGE = mmap.PAGESIZE
_HASH_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: "SafetensorsFile"
    start: int  # absolute byte offset of the first element in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


class _Background:
    """One thread that hashes consumed blocks and then drops their pages, in order.

    hashlib releases the GIL, so hashing overlaps with the merge arithmetic.
    A page release queued after a block's hash runs only once that hash is
    done, so pages are never faulted in twice; the bounded queue keeps the
    reader at most a few blocks ahead, which bounds RSS.
    """

    def __init__(self, depth: int = 16):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="weightops-hash", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            fn = self.q.get()
            try:
                if self.error is None:
                    fn()
            except BaseException as e:  # surfaced by the next flush()
                self.error = e
            finally:
                self.q.task_done()

    def submit(self, fn) -> None:
        self.q.put(fn)

    def flush(self) -> None:
        self.q.join()
        if self.error is not None:
            err, self.error = self.error, None
            raise err


_BACKGROUND: _Background | None = None
_BACKGROUND_LOCK = threading.Lock()


def _background() -> _Background:
    global _BACKGROUND
    with _BACKGROUND_LOCK:
        if _BACKGROUND is None or not _BACKGROUND.thread.is_alive():
            _BACKGROUND = _Background()
        return _BACKGROUND


class _StreamHash:
    """sha256 of a file, fed by the reads we do anyway, in whatever order.

    A read at or past the current position advances the hash to its end;
    re-reads of earlier bytes are ignored; `digest()` hashes whatever is
    left. Bytes are hashed from the file (pread, on the background thread),
    never from our private mapping: code that modifies a block in place
    cannot change the recorded hash, and hashing never grows our RSS.
    """

    def __init__(self, size: int):
        self.size = size
        self.pos = 0
        self.h = hashlib.sha256()
        # A failure belongs to this file and is raised only when its digest is
        # asked for, never by an unrelated flush (e.g. of another file's hash).
        self.error: BaseException | None = None

    def feed(self, fd: int, stop: int) -> None:
        if self.error is not None:
            return
        try:
            while self.pos < stop:
                chunk = os.pread(fd, min(stop - self.pos, _HASH_CHUNK), self.pos)
                if not chunk:
                    raise CheckpointError("file shrank while being read")
                self.h.update(chunk)
                self.pos += len(chunk)
        except (OSError, CheckpointError) as e:
            self.error = e

    def digest(self, fd: int, where: str) -> str:
        self.feed(fd, self.size)
        if self.error is not None:
            raise CheckpointError(f"{where}: cannot hash the input ({self.error}); was it modified during the run?")
        return self.h.hexdigest()


class SafetensorsFile:
    """A validated, lazily memory-mapped safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        header_len, header = self._read_header()
        self.data_start = 8 + header_len
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = self._parse_entries(header)
        self._fd: int | None = None
        self._mm: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._hash = _StreamHash(self.size)

    # -- validation -----------------------------------------------------------------
    def _read_header(self) -> tuple[int, dict]:
        where = str(self.path)
        if self.size < 8:
            raise CheckpointError(f"{where}: truncated safetensors file ({self.size} bytes, no header)")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES or 8 + n > self.size:
                raise CheckpointError(
                    f"{where}: corrupt or truncated safetensors header (declares {n} header bytes, file has {self.size})"
                )
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{where}: corrupt safetensors header ({e.__class__.__name__}: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{where}: corrupt safetensors header (not a JSON object)")
        return n, header

    def _parse_entries(self, header: dict) -> dict[str, TensorInfo]:
        where = str(self.path)
        entries = []
        for name, e in header.items():
            try:
                dtype_name, shape, (begin, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{where}: corrupt header entry for tensor '{name}'") from None
            if dtype_name not in DTYPES:
                raise CheckpointError(f"{where}: tensor '{name}' has unsupported dtype {dtype_name}")
            dtype = DTYPES[dtype_name]
            numel = 1
            for s in shape:
                if s < 0:
                    raise CheckpointError(f"{where}: tensor '{name}' has a negative dimension")
                numel *= s
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(
                    f"{where}: tensor '{name}' declares {end - begin} bytes but {dtype_name}{list(shape)} needs {nbytes}"
                )
            entries.append((begin, end, name, dtype, shape))
        entries.sort(key=lambda t: (t[0], t[1]))
        pos = 0
        out: dict[str, TensorInfo] = {}
        for begin, end, name, dtype, shape in entries:
            if begin < pos:
                raise CheckpointError(f"{where}: tensor '{name}' overlaps another tensor (corrupt header)")
            pos = end
            out[name] = TensorInfo(name, dtype, shape, self, self.data_start + begin, end - begin)
        if self.data_start + pos > self.size:
            raise CheckpointError(
                f"{where}: truncated safetensors file (data needs {self.data_start + pos} bytes, file has {self.size})"
            )
        return out

    # -- reading --------------------------------------------------------------------
    def _open(self) -> memoryview:
        if self._view is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            # ACCESS_COPY: a private mapping is writable, which torch.frombuffer
            # wants, while the file itself can never be modified through it.
            if self.size:
                self._mm = mmap.mmap(self._fd, self.size, access=mmap.ACCESS_COPY)
                self._view = memoryview(self._mm)
            else:
                self._view = memoryview(b"")
        return self._view

    def read(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Flat elements [start, stop) of a tensor: a zero-copy view on the mapping."""
        n = stop - start
        if n <= 0:
            return torch.empty(0, dtype=info.dtype)
        self._open()
        b0 = info.start + start * info.itemsize
        b1 = b0 + n * info.itemsize
        fd, h = self._fd, self._hash
        _background().submit(lambda: h.feed(fd, b1))
        if info.dtype == torch.bool:
            return torch.frombuffer(self._mm, dtype=torch.uint8, count=n, offset=b0).view(torch.bool)
        return torch.frombuffer(self._mm, dtype=info.dtype, count=n, offset=b0)

    def release(self, info: TensorInfo, start: int, stop: int) -> None:
        """Drop the pages of elements [start, stop) from this process (they stay in the page cache)."""
        if self._mm is None or stop <= start:
            return
        b0 = info.start + start * info.itemsize
        b1 = info.start + stop * info.itemsize
        p0 = (b0 + _PAGE - 1) // _PAGE * _PAGE  # only whole pages: neighbours may still be in use
        p1 = b1 // _PAGE * _PAGE
        if p1 > p0:
            mm = self._mm
            _background().submit(lambda: mm.madvise(mmap.MADV_DONTNEED, p0, p1 - p0))

    def sha256(self) -> str:
        """sha256 of the whole file; costs only the bytes no read has hashed yet."""
        self._open()
        _background().flush()
        return self._hash.digest(self._fd, str(self.path))

    def close(self) -> None:
        _background().flush()
        try:
            if self._view is not None:
                self._view.release()
            if self._mm is not None:
                self._mm.close()
        except BufferError:
            pass  # a tensor view still points into the mapping; it is unmapped when that goes
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._mm = self._view = None
        self._hash = _StreamHash(self.size)
