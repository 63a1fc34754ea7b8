"""`weightops doctor`: environment and native-kernel diagnostics."""
from __future__ import annotations

import os
import platform

import typer

from weightops.cli import app


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@app.command()
def doctor() -> None:
    """Print torch version, native extension status, CPU features and CUDA availability."""
    import torch

    import weightops
    import weightops.ops as ops
    from weightops.ops import _ext

    st = _ext.status()
    lines = [
        f"weightops      {weightops.__version__}",
        f"python         {platform.python_version()} ({platform.machine()})",
        f"torch          {torch.__version__} (cuda build: {torch.version.cuda or 'no'}, "
        f"threads: {torch.get_num_threads()})",
        f"extension      {'loaded' if st['loaded'] else 'not available'}: "
        f"{st['path'] if st['loaded'] else st['reason']}",
    ]
    if st["loaded"]:
        lines.append(f"build          {torch.ops.weightops._build_info()}")
        native_ops = ["delta_merge", "weighted_sum", "abs_histogram", "philox_keep_mask_out"]
        for dev in ("cpu", "cuda"):
            have = [op for op in native_ops if ops.has_kernel(op, dev)]
            lines.append(f"native {dev:<7} {', '.join(have) if have else 'none'}")
    flags = _cpu_flags()
    if flags:
        wanted = ["avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "f16c"]
        lines.append("cpu features   " + " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted))
    try:
        mode = ops.kernels_in_use()
    except Exception as e:  # WEIGHTOPS_KERNELS=native without an extension
        mode = f"error: {e}"
    lines.append(f"kernels        {mode} (WEIGHTOPS_KERNELS={os.environ.get('WEIGHTOPS_KERNELS', 'auto')})")
    if torch.cuda.is_available():
        lines.append(f"cuda           available: {torch.cuda.device_count()} device(s), {torch.cuda.get_device_name(0)}")
    else:
        lines.append("cuda           not available")
    typer.echo("\n".join(lines))
