"""Knob values that make garbage are errors (every command), and an output the merge made non-finite
from finite inputs is an error under --strict and a warning that says so otherwise."""
from __future__ import annotations

import inspect

import pytest
import torch

from checkpoints import make_bert_state, write_model
from clirun import one_line_error, run_cli
from weightops.engine import merge
from weightops.errors import NumericError, WeightopsError
from weightops.io.checkpoint import Checkpoint

BAD = ("nan", "inf", "-inf", "1e39")  # 1e39: finite in Python, inf in float32 (the compute dtype)


def _commands():
    """(command words, float parameter, its flag, required arguments) for every float option of the CLI."""
    import weightops.cli as cli

    out = []

    def walk(t, prefix):
        for info in t.registered_commands:
            words = prefix + [info.name or info.callback.__name__.replace("_", "-")]
            params = inspect.signature(info.callback).parameters
            required = []
            for k, p in params.items():
                if getattr(p.default, "default", None) is not ...:
                    continue
                decls = getattr(p.default, "param_decls", None)
                if type(p.default).__name__ == "ArgumentInfo":
                    required.append("x")
                else:
                    required += [decls[0] if decls else "--" + k.replace("_", "-"), "x"]
            for k, p in params.items():
                if "float" in str(p.annotation):
                    decls = getattr(p.default, "param_decls", None) or ()
                    flag = next((d for d in decls if d.startswith("--")), "--" + k.replace("_", "-"))
                    out.append((words, k, flag, required))
        for g in t.registered_groups:
            walk(g.typer_instance, prefix + [g.name])

    walk(cli.app, [])
    return out


COMMANDS = _commands()


def test_every_float_option_of_every_command_is_checked():
    from typer.testing import CliRunner

    from weightops.cli import app

    assert {tuple(w) for w, *_ in COMMANDS} >= {("merge",), ("prune",), ("graft",), ("reset",), ("patch", "create"),
                                                ("patch", "apply"), ("soup",), ("interpolate",), ("intruders",)}
    runner = CliRunner()
    for words, name, flag, required in COMMANDS:
        for bad in BAD:
            res = runner.invoke(app, [*words, *required, flag, bad])
            assert isinstance(res.exception, WeightopsError), (words, flag, bad, res.output, res.exception)
            assert flag in str(res.exception) and "finite" in str(res.exception), str(res.exception)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("knobs")
    base = make_bert_state(0)
    return root, write_model(root / "base", base), write_model(root / "ft", make_bert_state(1, base=base))


@pytest.mark.parametrize("args,needle", [
    (["--method", "task_arithmetic", "--lambda", "nan"], "--lambda"),
    (["--method", "linear", "--weights", "inf,1"], "--weights"),
    (["--method", "linear", "--weights", "1e308,1e308"], "--weights"),  # was an all-zero model (1e308 + 1e308 = inf)
    (["--method", "dare_linear", "--rescale", "darex-q", "--q", "nan"], "--q"),
    (["--method", "slerp", "--t", "nan"], "--t"),
])
def test_cli_knobs(pair, args, needle):
    root, b, ft = pair
    res = run_cli("merge", ft, ft, "--base", b, *args, "--out", root / "out")
    one_line_error(res, needle, "finite")
    assert not (root / "out").exists()


def test_python_api_and_recipes_check_knobs(pair, tmp_path):
    root, b, ft = pair
    for kw in ({"lam": float("nan")}, {"weights": [float("inf"), 1.0]}, {"weights": [1e308, 1e308]}):
        with pytest.raises(WeightopsError, match="finite"):
            merge([ft, ft], base=b, method="task_arithmetic", out=tmp_path / "o", quiet=True, **kw)
    from weightops.dpp.api import prune
    from weightops.interpolate import interpolate
    from weightops.patches.create import create_patch
    from weightops.sparse.graft import graft
    from weightops.sparse.reset import reset

    calls = [lambda: prune(b, ft, out=tmp_path / "p", rate=float("nan")),
             lambda: prune(b, ft, out=tmp_path / "p", method="darex-q", rate=0.9, q="nan"),
             lambda: graft(b, ft, out=tmp_path / "g", sparsity=float("nan")),
             lambda: reset(b, ft, tmp_path / "r", fraction=float("inf")),
             lambda: create_patch(b, tmp_path / "c", finetuned=ft, energy=float("nan")),
             lambda: interpolate(b, ft, out=tmp_path / "i", alpha=float("inf"))]
    for call in calls:
        with pytest.raises(WeightopsError, match="finite"):
            call()
    from weightops.recipes import plan_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"steps:\n  - step: merge\n    models: [{ft}]\n    base: {b}\n    method: task_arithmetic\n"
                      f"    lam: .nan\n    out: {tmp_path / 'm'}\n")
    with pytest.raises(WeightopsError, match="option 'lam' must be finite"):
        plan_recipe(recipe)
    assert not any(p.name in ("o", "p", "g", "r", "c", "i", "m") for p in tmp_path.iterdir())


def test_float32_overflow_made_by_the_merge(pair, tmp_path):
    """Finite inputs, finite knobs, an infinite fp32 sum: an error under --strict (also when writing fp16, which
    used to take the Inf), a warning naming the cause otherwise."""
    root, b, ft = pair
    for extra in (["--dtype", "float32"], ["--dtype", "float16", "--clamp"]):  # --clamp: past the fp16 range check
        args = ("merge", ft, ft, "--method", "linear", "--weights", "3e38,3e38", "--no-normalize", *extra)
        one_line_error(run_cli(*args, "--strict", "--out", tmp_path / "o"), "from finite inputs", "float32 overflow")
        assert not (tmp_path / "o").exists()
    res = run_cli("merge", ft, ft, "--method", "linear", "--weights", "3e38,3e38", "--no-normalize", "--out",
                  tmp_path / "w", "-q")
    assert res.returncode == 0
    warn = [l for l in res.stderr.splitlines() if "output not finite" in l]
    assert warn and "from finite inputs" in warn[0] and "NaN/Inf in input" not in res.stderr, res.stderr
    got = Checkpoint(tmp_path / "w").load()
    assert not bool(torch.isfinite(got["encoder.layer.0.output.LayerNorm.weight"]).all())


def test_nonfinite_input_is_named_as_the_cause(pair, tmp_path):
    root, b, ft = pair
    sd = Checkpoint(ft).load()
    sd["pooler.dense.weight"][0, 0] = float("inf")
    bad = write_model(tmp_path / "bad", sd)
    res = merge([ft, bad], method="linear", out=tmp_path / "o", quiet=True)
    assert any("NaN/Inf in input tensor 'pooler.dense.weight' of model 2" in w for w in res.warnings)
    assert not any("output not finite" in w for w in res.warnings)
    with pytest.raises(NumericError, match="model 2"):
        merge([ft, bad], method="linear", strict=True, out=tmp_path / "o2", quiet=True)
