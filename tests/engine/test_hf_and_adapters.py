"""Outputs load with transformers unchanged; LoRA adapters merge as θ0 + s·B·A."""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import pytest
import torch

from weightops.engine import merge
from weightops.info import verify
from weightops.io.checkpoint import Checkpoint
from weightops.methods import reference as R


@pytest.mark.parametrize("shard_size", ["5GB", "20KB"])
def test_output_loads_with_transformers(tiny_models, tmp_path, shard_size):
    from transformers import AutoModel

    ms = [tiny_models[f"ft{i}"] for i in range(3)]
    res = merge(ms, base=tiny_models["base"], method="ties", density=0.5, out=tmp_path / "m", shard_size=shard_size, quiet=True)
    if shard_size == "20KB":
        assert (res.out / "model.safetensors.index.json").is_file() and len(res.manifest["outputs"]["shards"]) > 1
    model = AutoModel.from_pretrained(res.out)
    want = R.task_vector_merge(tiny_models["base_sd"], [tiny_models[f"ft{i}_sd"] for i in range(3)],
                               consensus="ties", density=0.5, trim_scope="global")
    sd = model.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(sd[k], v.to(sd[k].dtype), rtol=1e-5, atol=1e-6)
    assert verify(res.out)["ok"]


def test_manifest_records_inputs_and_outputs(tiny_models, tmp_path):
    res = merge([tiny_models["ft0"], tiny_models["ft1"]], base=tiny_models["base"], method="dare", drop_rate=0.5, seed=5,
                out=tmp_path / "m", quiet=True, command=["weightops", "merge", "..."])
    man = json.loads((res.out / "weightops.json").read_text())
    assert man["method"] == "dare_linear" and man["params"]["drop_rate"] == 0.5 and man["seed"] == 5
    for inp in man["inputs"]:
        for f in inp["files"]:  # computed while streaming, must equal a plain hash of the file
            with open(f["file"], "rb") as fh:
                assert f["sha256"] == hashlib.sha256(fh.read()).hexdigest()
    ck = Checkpoint(res.out)
    for name, t in man["outputs"]["tensors"].items():
        x = ck.read(name, 0, ck.infos[name].numel)
        assert t["sha256"] == hashlib.sha256(x.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    ck.close()
    # tampering is caught
    raw = bytearray((res.out / "model.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (res.out / "model.safetensors").write_bytes(bytes(raw))
    r = verify(res.out)
    assert not r["ok"] and "sha256 differs" in r["problems"][0]


def _adapter(tmp_path, base_dir, rslora: bool, r: int = 2, alpha: float = 6.0):
    """A PEFT LoRA adapter on the tiny BERT with random (non-zero) B factors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(3)
    model = AutoModel.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["query", "value", "dense"],
                                                  use_rslora=rslora, init_lora_weights=False))
    out = tmp_path / f"adapter-{rslora}"
    peft_model.save_pretrained(out)
    merged = peft_model.merge_and_unload().state_dict()
    return out, merged


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_adapter_as_model(tiny_models, tmp_path, rslora):
    """An adapter merges like the model peft's merge_and_unload produces, without materialising it."""
    adapter, peft_merged = _adapter(tmp_path, tiny_models["base"], rslora)
    res = merge([adapter], base=tiny_models["base"], method="task_arithmetic", out=tmp_path / "m", block_size=37, quiet=True)
    got = Checkpoint(res.out).load()
    for k, v in peft_merged.items():
        torch.testing.assert_close(got[k].reshape(v.shape), v, rtol=1e-5, atol=1e-6, msg=k)
    # and mixed with a full fine-tune
    res2 = merge([adapter, tiny_models["ft0"]], base=tiny_models["base"], method="task_arithmetic", weights=[0.5, 0.5],
                 out=tmp_path / "m2", quiet=True)
    got2 = Checkpoint(res2.out).load()
    base = tiny_models["base_sd"]
    for k, v in peft_merged.items():
        want = base[k] + 0.5 * (v - base[k]) + 0.5 * (tiny_models["ft0_sd"][k] - base[k])
        torch.testing.assert_close(got2[k].reshape(v.shape), want, rtol=1e-5, atol=1e-6)


def test_adapter_inspect_and_diff(tiny_models, tmp_path):
    from weightops.info import diff, inspect

    adapter, peft_merged = _adapter(tmp_path, tiny_models["base"], False)
    info = inspect(adapter, base=tiny_models["base"])
    assert info["kind"] == "lora" and len(info["adapted"]) > 0
    assert all(math.isclose(a["scale"], 3.0) for a in info["adapted"])  # alpha 6 / r 2
    d = diff(tiny_models["base"], adapter)
    changed = {r["name"] for r in d["tensors"] if r["l2"] > 0}
    assert changed == {k for k in peft_merged if not torch.equal(peft_merged[k], tiny_models["base_sd"][k])}


def test_help_does_not_import_torch():
    """What keeps `weightops --help` fast (its time is measured in benchmarks/merge.py, not asserted here)."""
    code = ("import sys, weightops.cli; from weightops.cli import app; import typer.main; "
            "typer.main.get_command(app); assert 'torch' not in sys.modules, 'torch imported'")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    res = subprocess.run([sys.executable, "-m", "weightops", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "merge" in res.stdout
