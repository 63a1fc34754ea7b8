"""The merge-method contract and the one registry.

A method sees one output tensor at a time through a `TensorJob`: it may make
statistics passes over the tensor's blocks first (`prepare`), then computes
each output block from the same block of every input (`merge_block`). Methods
that need model-wide statistics (TIES with a global trim) get one call to
`prepare_model` before any tensor is merged. All arithmetic goes through
`weightops.ops`, so the reference and the native kernels give the same bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator

import torch

from weightops.errors import WeightopsError, check_finite


@dataclass
class MergeParams:
    """Every knob of every method; each method says which ones it reads."""

    weights: list[float] | None = None
    lam: float | None = None  # λ, scales the merged task vector
    density: float | None = None  # fraction of |δ| kept by the magnitude trim
    gamma: float | None = None  # breadcrumbs: fraction of the largest |δ| removed
    drop_rate: float | None = None  # DARE: probability of DROPPING an element
    rescale: str | None = None  # DARE: dare (1/(1-p)) | darex-q (1/q) | l1 | none
    q: float | None = None  # DAREx-q divisor, 1-p <= q <= 1
    trim_scope: str | None = None  # ties: global | tensor
    t: float | None = None  # slerp interpolation factor
    normalize: bool | None = None  # linear: divide weights by their sum
    # mergekit's methods (names and defaults as mergekit 0.1.5; see weightops.mergekit_compat.PARAMETER_MAP)
    epsilon: float | list[float] | None = None  # della: keep-probability spread; ram: |δ| threshold
    select_topk: float | None = None  # sce: fraction of elements kept by delta variance
    nuslerp_row_wise: bool | None = None  # nuslerp: slerp each column (True) / row (False) unless flattened
    nuslerp_flatten: bool | None = None  # nuslerp: slerp whole tensors (default)
    max_iter: int | None = None  # karcher: iterations
    tol: float | None = None  # karcher: convergence tolerance
    filter_wise: bool | None = None  # model_stock: one t per row instead of per tensor
    eps: float | None = None  # multislerp: added to norms
    r: float | None = None  # ramplus_tl: strength of the unique-delta boost
    alpha: float | None = None  # ramplus_tl: cap of the overlap ratio
    scale: float | list[float] | None = None  # passthrough: multiply the tensor
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


STATS_MIN_BLOCK = 1 << 16  # elements


@dataclass
class TensorJob:
    """One output tensor: its inputs, and block-wise access to them."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    base: Any  # a source (Checkpoint/LoraAdapter) or None
    models: list[Any]
    block_size: int
    # (job, start, stop, which models or None for all) -> (base block, model blocks)
    read_block: Callable[..., tuple[torch.Tensor | None, list[torch.Tensor]]] = field(repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def ranges(self, block_size: int | None = None) -> Iterator[tuple[int, int]]:
        n, step = self.numel, block_size or self.block_size
        for start in range(0, n, step):
            yield start, min(n, start + step)

    def blocks(self, which: list[int] | None = None) -> Iterator[tuple[int, torch.Tensor | None, list[torch.Tensor]]]:
        """(start, base block, blocks of the models in `which`) over the whole tensor, for statistics passes."""
        idx = range(len(self.models)) if which is None else which
        sources = ([self.base] if self.base is not None else []) + [self.models[i] for i in idx]
        # Statistics are exact whatever the blocking, so tiny output blocks need
        # not mean tiny (per-call-overhead-bound) statistics blocks.
        for start, stop in self.ranges(max(self.block_size, STATS_MIN_BLOCK)):
            base, models = self.read_block(self, start, stop, which)
            yield start, base, models
            # Drop the pages once the consumer moves on: a model-wide pass
            # (global TIES) would otherwise keep the whole model resident.
            for src in sources:
                release = getattr(src, "release", None)
                if release is not None:
                    release(self.name, start, stop)


class Method:
    """Base class: subclasses set the class attributes and implement merge_block."""

    name: str = ""
    summary: str = ""
    reference_url: str = ""
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    uses: tuple[str, ...] = ()  # MergeParams fields this method reads
    defaults: dict[str, Any] = {}

    def resolve(self, params: MergeParams, n_models: int) -> MergeParams:
        """Fill defaults, reject knobs the method does not read, validate ranges."""
        given = params.as_dict()
        unused = [k for k in given if k not in self.uses and k != "seed"]
        if unused:
            raise WeightopsError(f"method {self.name} does not take {', '.join('--' + k.replace('_', '-') for k in unused)}")
        check_finite(**given)
        out = MergeParams(**{**self.defaults, **given})
        if out.weights is not None and len(out.weights) != n_models:
            raise WeightopsError(f"--weights has {len(out.weights)} values for {n_models} models")
        self.validate(out, n_models)
        return out

    def validate(self, p: MergeParams, n_models: int) -> None:
        pass

    def prepare_model(self, jobs: list[TensorJob], p: MergeParams) -> Any:
        return None

    def prepare(self, job: TensorJob, p: MergeParams, model_state: Any) -> Any:
        return None

    def merge_block(self, job: TensorJob, p: MergeParams, state: Any, start: int,
                    base: torch.Tensor | None, models: list[torch.Tensor]) -> torch.Tensor:
        """Output elements [start, start + len) in fp32 (the executor checks and casts)."""
        raise NotImplementedError


REGISTRY: dict[str, Method] = {}
ALIASES: dict[str, str] = {"dare": "dare_linear", "soup": "linear", "uniform": "linear"}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    import weightops.methods  # noqa: F401  (registers the built-in methods)

    key = ALIASES.get(name, name)
    if key not in REGISTRY:
        raise WeightopsError(f"unknown method '{name}'; choose from {', '.join(sorted(REGISTRY))} (alias: dare)")
    return REGISTRY[key]


def check_fraction(name: str, value: float | None, lo: float = 0.0, hi: float = 1.0) -> None:
    if value is not None and not (lo <= value <= hi):
        raise WeightopsError(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {value}")
