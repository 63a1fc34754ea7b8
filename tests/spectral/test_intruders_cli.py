"""`weightops intruders`: report files, several targets, mitigation, one-line errors with nothing left behind."""
from __future__ import annotations

import json
import subprocess
import sys

from safetensors.torch import load_file


def run_cli(*args, env_cache):
    import os

    env = dict(os.environ, WEIGHTOPS_CACHE=str(env_cache), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "weightops", "intruders", *map(str, args)], capture_output=True,
                          text=True, env=env)


def test_report_compare_and_mitigate(tmp_path, family):
    res = run_cli(family["base"], family["lora"], "--compare", family["ft"], "--labels", "lora,full", "--out", tmp_path / "rep",
                  "--eps-grid", "0.2,0.5,0.8", env_cache=tmp_path / "c")
    assert res.returncode == 0, res.stderr
    assert "lora:" in res.stdout and "full:" in res.stdout
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [t["label"] for t in rep["targets"]] == ["lora", "full"]
    assert set(rep["targets"][0]["counts_vs_eps"]) == {"0.2", "0.5", "0.8"}
    assert rep["targets"][0]["total"] > rep["targets"][1]["total"]
    for f in ("index.html", "heatmap.png", "counts_vs_eps.png", "spectrum.png", "cosine.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 0, f
    assert rep["detail"]["name"] in {m["name"] for m in rep["targets"][0]["matrices"] if m["count"]}
    assert (tmp_path / "c" / "svd").is_dir()  # the cache went where WEIGHTOPS_CACHE says


def test_mitigate_in_process(tmp_path, family, monkeypatch):
    from weightops.cli import main

    monkeypatch.setenv("WEIGHTOPS_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(sys, "argv", ["weightops", "intruders", str(family["base"]), str(family["lora"]),
                                      "--write-model", str(tmp_path / "mit"), "--scale", "0.5", "-q"])
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None)
    out = load_file(str(tmp_path / "mit" / "model.safetensors"))
    assert set(out) == set(family["base_sd"])


def _one_line_error(monkeypatch, capsys, needle, *args):
    """The CLI entry point in-process (a subprocess per case costs seconds of torch import)."""
    from weightops.cli import main

    monkeypatch.setattr(sys, "argv", ["weightops", "intruders", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_errors(tmp_path, family, monkeypatch, capsys):
    monkeypatch.setenv("WEIGHTOPS_CACHE", str(tmp_path / "c"))
    _one_line_error(monkeypatch, capsys, "no such file", tmp_path / "nope", family["ft"])
    _one_line_error(monkeypatch, capsys, "no 2-D weight", family["base"], family["ft"], "--modules", "zzz",
                    "--out", tmp_path / "r")
    _one_line_error(monkeypatch, capsys, "LoRA adapter", family["base"], family["ft"], "--write-adapter", tmp_path / "a")
    _one_line_error(monkeypatch, capsys, "exactly one target", family["base"], family["ft"], family["lora"],
                    "--write-model", tmp_path / "m")
    _one_line_error(monkeypatch, capsys, "--eps-grid", family["base"], family["ft"], "--eps-grid", "0.1,x")
    _one_line_error(monkeypatch, capsys, "exists", family["base"], family["ft"], "--out", tmp_path / "c", "-q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # nothing half-written
