"""Running the `weightops` CLI in a subprocess and checking its one-line errors (shared by test packages)."""
from __future__ import annotations

import subprocess
import sys


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "weightops", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def one_line_error(res, *needles) -> None:
    """Exit 2 and exactly one stderr line, `error: ...`, containing every needle."""
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
