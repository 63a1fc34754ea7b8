import os
import subprocess
import sys

from typer.testing import CliRunner

from weightops.cli import app


def test_doctor_reports_versions_extension_and_cuda():
    import torch

    from weightops.ops import _ext

    out = CliRunner().invoke(app, ["doctor"])
    assert out.exit_code == 0, out.output
    assert f"torch          {torch.__version__}" in out.output
    assert "cuda           " in out.output and "cpu features" in out.output
    assert ("extension      loaded" in out.output) == _ext.load()


def test_doctor_says_why_when_extension_is_disabled():
    env = dict(os.environ, WEIGHTOPS_DISABLE_EXT="1")
    code = "from weightops.cli import app; app(['doctor'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout
    assert "not available: disabled by WEIGHTOPS_DISABLE_EXT=1" in out
    assert "kernels        reference" in out
