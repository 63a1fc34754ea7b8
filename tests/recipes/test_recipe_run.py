"""`weightops run`: expansion and validation, determinism, atomic per target, stop / continue on error, registry."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "patches"))
from checkpoints import make_bert_state, write_model  # noqa: E402
from patchkit import cli, one_error_line  # noqa: E402
from weightops import recipes  # noqa: E402
from weightops.io.checkpoint import Checkpoint  # noqa: E402
from weightops.patches import apply_patch, create_patch  # noqa: E402
from weightops.recipes import RecipeError, plan_recipe, recipe_step, run_recipe  # noqa: E402

I1 = "encoder.layer.1.intermediate.dense.weight"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """v1, a full fine-tune of it, two evolved versions, and one version whose FFN shape changed."""
    root = tmp_path_factory.mktemp("world")
    v1 = make_bert_state(0)
    out = {"root": root, "v1": write_model(root / "v1", v1), "ft": write_model(root / "ft", make_bert_state(3, base=v1))}
    out["v2"] = write_model(root / "v2", make_bert_state(4, base=v1, scale=0.05))
    out["v3"] = write_model(root / "v3", make_bert_state(5, base=v1, scale=0.05), shards=2)
    bad = make_bert_state(6, base=v1, scale=0.05)
    bad[I1] = bad[I1][:-2].clone()
    out["bad"] = write_model(root / "bad", bad)
    return out


def recipe(tmp_path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(textwrap.dedent(text))
    return p


PORT = """
    vars:
      root: {root}
      out: {out}
      rank: 4
    steps:
      - step: patch-create
        base: ${{root}}/v1
        finetuned: ${{root}}/ft
        rank: ${{rank}}
        out: ${{out}}/patch
      - step: patch-apply
        patch: ${{out}}/patch
        targets:
          - to: ${{root}}/v2
            out: ${{out}}/v2
          - to: ${{root}}/{second}
            out: ${{out}}/second
          - to: ${{root}}/v3
            out: ${{out}}/v3
            scale: 0.5
"""


def tensor_sums(out_dir) -> dict:
    return {k: v["sha256"] for k, v in json.loads((Path(out_dir) / "weightops.json").read_text())["outputs"]["tensors"].items()}


def test_recipe_is_deterministic_and_equals_the_api(world, tmp_path):
    text = PORT.format(root=world["root"], out=tmp_path / "a", second="v3")
    res = run_recipe(recipe(tmp_path, text), quiet=True)
    assert res.ok and [r.status for r in res.runs] == ["ok"] * 4
    assert [r.options.get("scale") for r in res.runs] == [None, None, None, 0.5]
    assert res.runs[0].options["rank"] == 4  # a lone ${var} keeps its YAML type
    again = run_recipe(recipe(tmp_path, text), {"out": str(tmp_path / "b")}, quiet=True)
    assert again.ok
    for name in ("v2", "second", "v3"):
        assert tensor_sums(tmp_path / "a" / name) == tensor_sums(tmp_path / "b" / name)
    create_patch(world["v1"], tmp_path / "p", finetuned=world["ft"], rank=4, quiet=True)
    apply_patch(tmp_path / "p", world["v3"], tmp_path / "direct", scale=0.5, quiet=True)
    assert tensor_sums(tmp_path / "direct") == tensor_sums(tmp_path / "a" / "v3")


def test_stops_at_the_first_incompatible_target(world, tmp_path, capsys):
    out = tmp_path / "o"
    path = recipe(tmp_path, PORT.format(root=world["root"], out=out, second="bad"))
    code, stdout, err = cli(capsys, "run", path, "--report", tmp_path / "report.json")
    assert "Traceback" not in err
    line = one_error_line(code, _errors_only(err))
    assert "step 2 (patch-apply second) failed" in line and "shape mismatch" in line and "1 step(s) not run" in line
    assert sorted(p.name for p in out.iterdir()) == ["patch", "v2"]  # v2 done, nothing of 'second' or v3
    assert Checkpoint(out / "v2").infos
    assert "failed" in stdout and "not run" in stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["status"] for r in report["runs"]] == ["ok", "ok", "failed", "not run"] and not report["ok"]


def _errors_only(err: str) -> str:
    """stderr minus the progress display's lines."""
    return "\n".join(x for x in err.replace("\r", "\n").splitlines() if x.startswith("error:"))


def test_continue_on_error_runs_the_rest_and_still_fails(world, tmp_path):
    out = tmp_path / "o"
    path = recipe(tmp_path, PORT.format(root=world["root"], out=out, second="bad"))
    with pytest.raises(RecipeError, match="step 2 .* failed") as e:
        run_recipe(path, continue_on_error=True, quiet=True)
    assert [r.status for r in e.value.result.runs] == ["ok", "ok", "failed", "ok"]
    assert sorted(p.name for p in out.iterdir()) == ["patch", "v2", "v3"]


def test_everything_is_validated_before_anything_runs(world, tmp_path):
    base = PORT.format(root=world["root"], out=tmp_path / "o", second="v3")
    cases = {
        "unknown option 'scael'": base.replace("scale: 0.5", "scael: 0.5"),
        "unknown variable ${nope}": base.replace("${out}/v3", "${nope}/v3"),
        "unknown step 'patch-aply'": base.replace("step: patch-apply", "step: patch-aply"),
        "missing option 'patch'": base.replace("        patch: ${out}/patch\n", ""),
        "'quiet' is set by the runner": base.replace("scale: 0.5", "quiet: true"),
        "'targets' must be a non-empty list": base.replace("targets:", "targets: []\n        xtargets:"),
        "option 'scale' should be a number, got str 'half'": base.replace("scale: 0.5", "scale: half"),
    }
    for msg, text in cases.items():
        with pytest.raises(RecipeError, match=msg.replace("$", r"\$").replace("{", r"\{").replace("}", r"\}")):
            run_recipe(recipe(tmp_path, text), quiet=True)
        assert not (tmp_path / "o").exists(), msg


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        run_recipe(tmp_path / "none.yaml")
    with pytest.raises(RecipeError, match="invalid YAML at line 2"):
        run_recipe(recipe(tmp_path, "steps:\n  - {step: merge, out: ${x}}\n"))
    with pytest.raises(RecipeError, match="'steps' must be a non-empty list"):
        run_recipe(recipe(tmp_path, "vars: {}\n"))


def test_vars_env_anchors_defaults_and_set(world, tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTOPS_TEST_ROOT", str(world["root"]))
    text = """
        vars:
          ft: ${env:WEIGHTOPS_TEST_ROOT}/ft
          out: unused
        defaults:
          merge: {method: task_arithmetic, force: true}
        x-common: &common
          base: ${env:WEIGHTOPS_TEST_ROOT}/v1
        steps:
          - step: merge
            <<: *common
            models: ["${ft}", "${env:WEIGHTOPS_TEST_ROOT}/v2"]
            weights: [0.5, 0.5]
            out: ${out}/ta
    """
    runs, _ = plan_recipe(recipe(tmp_path, text), {"out": str(tmp_path / "o")})
    (run,) = runs
    assert run.options["method"] == "task_arithmetic" and run.options["force"] is True
    assert run.options["models"] == [str(world["ft"]), str(world["v2"])] and run.options["out"] == str(tmp_path / "o" / "ta")
    res = run_recipe(recipe(tmp_path, text), {"out": str(tmp_path / "o")}, quiet=True)
    assert res.ok and (tmp_path / "o" / "ta" / "weightops.json").is_file()
    anchored = textwrap.dedent("""
        vars: {root: %s}
        steps:
          - &apply {step: patch-check, patch: "${root}/p", to: "${root}/v2"}
          - {<<: *apply, to: "${root}/v3"}
    """ % world["root"])
    runs, _ = plan_recipe(recipe(tmp_path, anchored), dry_run=True)
    assert [r.options["to"] for r in runs] == [str(world["v2"]), str(world["v3"])]


def test_steps_register_from_step_modules(tmp_path, monkeypatch):
    mod = tmp_path / "my_steps.py"
    mod.write_text(textwrap.dedent("""
        from weightops.recipes import recipe_step

        CALLS = []

        @recipe_step("echo", detail=lambda r: f"said {r['said']}")
        def echo(text: str, times: int = 1, quiet: bool = False):
            '''Repeat a text (a test step).'''
            CALLS.append((text, times, quiet))
            return {"said": text * times}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(recipes, "STEP_MODULES", recipes.STEP_MODULES + ["my_steps"])
    monkeypatch.setattr(recipes, "STEPS", dict(recipes.load_steps()))
    res = run_recipe(recipe(tmp_path, "steps:\n  - {step: echo, text: ab, times: 2}\n"), quiet=True)
    import my_steps

    assert my_steps.CALLS == [("ab", 2, True)] and res.runs[0].detail == "said abab"
    assert "echo" in res.table() and "1/1 ok" in res.table()


@pytest.mark.parametrize("name", ["port_patch.yaml", "svd_patches.yaml"])
def test_example_recipes_are_valid(name):
    path = Path(__file__).resolve().parents[2] / "examples" / "recipes" / name
    res = run_recipe(path, dry_run=True)  # expands and checks every step; ${zoo:...} stays a placeholder
    assert res.runs and all(r.status == "planned" for r in res.runs)


def test_option_types_are_checked_against_the_step_signature(tmp_path):
    text = """steps:
  - step: merge
    models: [a, b]
    method: linear
    weights: zero
    out: o
"""
    with pytest.raises(RecipeError, match=r"option 'weights' should be a list of \(a number\) or null, got str 'zero'"):
        plan_recipe(recipe(tmp_path, text))
    for ok in ("[1, 0.5]", "null"):
        plan_recipe(recipe(tmp_path, text.replace("zero", ok)))
    with pytest.raises(RecipeError, match="option 'force' should be true/false, got int 1"):
        plan_recipe(recipe(tmp_path, text.replace("weights: zero", "force: 1")))
