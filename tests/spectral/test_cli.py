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
    res = run_cli(family["base"], family["lora"], family["ft"], "--labels", "lora,full", "--out", tmp_path / "rep",
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
    res = run_cli(family["base"], family["lora"], "--write-model", tmp_path / "mit", "--scale", "0.5", "-q",
                  env_cache=tmp_path / "c")
    assert res.returncode == 0, res.stderr
    out = load_file(str(tmp_path / "mit" / "model.safetensors"))
    assert set(out) == set(family["base_sd"])


def _one_line_error(res, needle):
    assert res.returncode == 2, res.stdout
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr


def test_errors(tmp_path, family):
    _one_line_error(run_cli(tmp_path / "nope", family["ft"], env_cache=tmp_path), "no such file")
    _one_line_error(run_cli(family["base"], family["ft"], "--modules", "zzz", "--out", tmp_path / "r",
                            env_cache=tmp_path), "no 2-D weight")
    _one_line_error(run_cli(family["base"], family["ft"], "--write-adapter", tmp_path / "a", env_cache=tmp_path),
                    "LoRA adapter")
    _one_line_error(run_cli(family["base"], family["ft"], family["lora"], "--write-model", tmp_path / "m",
                            env_cache=tmp_path), "exactly one target")
    _one_line_error(run_cli(family["base"], family["ft"], "--eps-grid", "0.1,x", env_cache=tmp_path), "--eps-grid")
    assert not any(p.name.startswith((".r", "r", ".a", "a", ".m", "m")) for p in tmp_path.iterdir())
