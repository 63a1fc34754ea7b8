"""Every module imports on its own in a fresh interpreter.

A cycle between subpackages (dpp.rules -> methods -> sparse_consensus -> dpp.rules) only shows when
the cycle's other end is imported first, which the suite's import order hides; CI's notebooks found it.
One child process per module, forked from a parent that has imported torch (not weightops), so the
check costs a second rather than a torch import per module.
"""

import pkgutil
import subprocess
import sys

import weightops

_CHILD = r"""
import os, sys, traceback
import numpy, torch, safetensors  # the slow third-party imports, shared by the forks
bad = []
for name in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            __import__(name)
            code = 0
        except BaseException as e:
            os.write(w, f"{type(e).__name__}: {e}".encode()[:2000])
            code = 1
        os._exit(code)
    os.close(w)
    msg = os.read(r, 4000).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status:
        bad.append(f"{name}: {msg or status}")
print("\n".join(bad))
"""


def test_each_module_imports_first():
    mods = [m.name for m in pkgutil.walk_packages(weightops.__path__, "weightops.")
            if not m.name.startswith("weightops._C") and m.name != "weightops.__main__"]
    assert len(mods) > 20
    r = subprocess.run([sys.executable, "-c", _CHILD, *mods], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "", r.stdout
