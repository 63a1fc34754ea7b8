"""Masks and sparse deltas: one representation for grafting, LT-SFT composition and HFT resets.

The file format and its reader/writer are in `format.py`; `apply.py` writes
models from them (through `weightops.engine.run_streaming`). See docs/grafting.md.
"""
from weightops.sparse.apply import apply_mask, apply_sparse_delta  # noqa: F401
from weightops.sparse.format import (  # noqa: F401
    SparseFile,
    SparseTensor,
    SparseWriter,
    index_dtype,
    open_sparse,
    read_mask,
    read_sparse_delta,
    write_mask,
    write_sparse_delta,
)
