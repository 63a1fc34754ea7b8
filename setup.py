"""Build of weightops with its optional native extension `weightops._C`.

Environment switches (all read at build time):

  WEIGHTOPS_BUILD_EXT=0     build a pure-Python package; the ops use their pure-torch reference kernels.
  WEIGHTOPS_STRICT_BUILD=1  a failed extension build (or a missing torch) is an error. Default: warn and
                            install without the extension, which leaves the pure-torch path working.
  WEIGHTOPS_BUILD_CUDA=0    skip the CUDA sources. By default they are built only when the installed torch
                            has CUDA and CUDA_HOME is set (or found by torch).
  DEBUG=1                   -O0 -g instead of -O3.
  MAX_JOBS=N                parallel compile jobs (read by torch.utils.cpp_extension).

The extension compiles against the torch already installed, so install with
`pip install --no-build-isolation -e .` (pyproject.toml has no torch in its
build requirements on purpose). Flags that matter for correctness:
-ffp-contract=off / nvcc -fmad=false keep a*b+c as two roundings (an FMA would
break bit-identity with the reference); no -march=native, so the binary runs on
any x86-64 (the Philox loop is cloned for AVX2/AVX-512 and picked at run time).
"""
from __future__ import annotations

import glob
import os
import sys
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


STRICT = _flag("WEIGHTOPS_STRICT_BUILD") == "1"
DEBUG = _flag("DEBUG") == "1"


def _fail(msg: str) -> None:
    if STRICT:
        raise RuntimeError(f"weightops: {msg} (WEIGHTOPS_STRICT_BUILD=1)")
    warnings.warn(f"weightops: {msg}; installing without the native extension (pure-torch kernels)")
    print(f"WARNING: weightops: {msg}; installing without the native extension", file=sys.stderr)


def _extension_setup() -> dict:
    if _flag("WEIGHTOPS_BUILD_EXT", "1") == "0":
        return {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as e:  # no torch at build time: isolated build, or torch not installed yet
        _fail(f"torch is not importable at build time ({e}); use pip install --no-build-isolation")
        return {}

    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("kernels/cpu/*.cpp")
    cuda_sources = rel("kernels/cuda/*.cu")
    with_cuda = (bool(cuda_sources) and torch.version.cuda is not None and ce.CUDA_HOME is not None
                 and _flag("WEIGHTOPS_BUILD_CUDA", "1") != "0")
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    cxx = opt + ["-fopenmp", "-ffp-contract=off"]
    macros = [("WEIGHTOPS_WITH_CUDA", "1")] if with_cuda else []
    args = dict(
        name="weightops._C",
        sources=sources + (cuda_sources if with_cuda else []),
        include_dirs=[os.path.join(HERE, "kernels", "include")],
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": opt + ["-fmad=false", "--expt-relaxed-constexpr"]} if with_cuda
        else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    ext = ce.CUDAExtension(**args) if with_cuda else ce.CppExtension(**args)

    class BuildExt(ce.BuildExtension):
        """Never lets a compile failure abort the install unless strict."""

        def run(self):
            try:
                super().run()
            except Exception as e:
                _fail(f"building the native extension failed: {type(e).__name__}: {e}")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:
                _fail(f"building {ext.name} failed: {type(e).__name__}: {e}")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExt.with_options(use_ninja=True)}}


setup(**_extension_setup())
