"""Tokenizers in mergekit configs (weightops.tokenizer_merge): `tokenizer_source: union | base | <model>`,
`tokenizer: {tokens, pad_to_multiple_of}` and `chat_template`, on Llama-shaped models whose tokenizers differ
in added tokens (tests/mkcases.py make_token_models): the output loads in transformers, and every token's
embedding and lm_head row comes from the source docs/merging.md names; mergekit 0.1.5 itself on the same
configs, compared token by token."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

import mkcases
from checkpoints import write_tokenizer

VOCAB = mkcases.VOCAB_TENSORS


@pytest.fixture(scope="module")
def tm(tmp_path_factory):
    return mkcases.make_token_models(tmp_path_factory.mktemp("tok"))


def _load(path) -> dict:
    from weightops.io.checkpoint import Checkpoint

    ck = Checkpoint(path)
    try:
        return {k: v.float() for k, v in ck.load().items()}
    finally:
        ck.close()


def _vocab(path) -> dict:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)).get_vocab()


def _merge(cfg, out, **kw):
    from weightops.mergekit_compat import mergekit_merge

    return mergekit_merge(dict(cfg, dtype="float32", out_dtype="float32"), out, quiet=True, **kw)


def test_union_rows_come_from_the_documented_source(tm, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightops.io.checkpoint import Checkpoint

    cfg = {"models": [{"model": tm["a"], "parameters": {"weight": 0.6}}, {"model": tm["b"], "parameters": {"weight": 0.4}}],
           "merge_method": "task_arithmetic", "base_model": tm["base"],
           "tokenizer": {"source": "union", "tokens": {
               "<s>": {"source": tm["b"], "force": True},
               "<|new|>": {"source": {"kind": "zero"}},
               "<|alias|>": {"source": {"kind": "model_token", "model": tm["a"], "token_id": 5}}}}}
    res = _merge(cfg, tmp_path / "o", block_size=1001)  # blocks of 1001 elements end mid-row (rows of 40)
    out = res.out
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    v = tok.get_vocab()
    assert len(v) == 101 and json.loads((out / "config.json").read_text())["vocab_size"] == 101
    assert model.get_input_embeddings().weight.shape == (101, 40) and model.lm_head.weight.shape == (101, 40)
    ids = tok("the <|a1|> <|shared|> <|b1|>").input_ids
    assert [v["<|a1|>"], v["<|shared|>"], v["<|b1|>"]] == ids[-3:]
    assert {a.content: a.special for a in tok.added_tokens_decoder.values()}["<|b1|>"] is True
    with torch.no_grad():
        assert model(torch.tensor([ids])).logits.shape == (1, len(ids), 101)
    got, A, B, Z = _load(out), _load(tm["a"]), _load(tm["b"]), _load(tm["base"])
    va, vb, vz = _vocab(tm["a"]), _vocab(tm["b"]), _vocab(tm["base"])
    assert va["<|shared|>"] != vb["<|shared|>"]  # the permutation is exercised
    for name in VOCAB:
        E, a, b, z = got[name], A[name], B[name], Z[name]

        def ta(x0, xa, xb):
            return x0 + 0.6 * (xa - x0) + 0.4 * (xb - x0)
        # in every model: the merge of the three rows of the token
        for t in ("th", "q", "</s>"):
            torch.testing.assert_close(E[v[t]], ta(z[vz[t]], a[va[t]], b[vb[t]]), rtol=0, atol=1e-7)
            assert not torch.equal(E[v[t]], a[va[t]])
        # only in A / only in B: that model's row, exactly (every input holds it, so every delta is 0)
        assert torch.equal(E[v["<|a1|>"]], a[va["<|a1|>"]])
        assert torch.equal(E[v["<|b1|>"]], b[vb["<|b1|>"]])
        # in A and B, not in the base: the base input holds their mean; A and B their own rows
        m = (a[va["<|shared|>"]] + b[vb["<|shared|>"]]) / 2
        torch.testing.assert_close(E[v["<|shared|>"]], ta(m, a[va["<|shared|>"]], b[vb["<|shared|>"]]), rtol=0, atol=1e-7)
        # tokens: forced from B; zero; a given row of A
        assert torch.equal(E[v["<s>"]], b[vb["<s>"]]) and not torch.equal(E[v["<s>"]], a[va["<s>"]])
        assert torch.equal(E[v["<|new|>"]], torch.zeros(40))
        assert torch.equal(E[v["<|alias|>"]], a[5])
    # the rest of the model is the plain merge
    k = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(got[k], Z[k] + 0.6 * (A[k] - Z[k]) + 0.4 * (B[k] - Z[k]), rtol=0, atol=1e-7)
    assert any("union" in n for n in res.warnings) and any("vocab_size set to 101" in n for n in res.warnings)
    # row blocks never change a result, and a block of rows is all that is read at once
    reads, read = [], Checkpoint.read

    def spy(self, name, start, stop):
        if name in VOCAB:
            reads.append(stop - start)
        return read(self, name, start, stop)
    monkeypatch.setattr(Checkpoint, "read", spy)
    out2 = _merge(cfg, tmp_path / "o2", block_size=33).out
    monkeypatch.undo()
    assert reads and max(reads) <= 2 * 40  # 33 elements span at most 2 rows of 40
    again = _load(out2)
    assert all(torch.equal(again[n], got[n]) for n in VOCAB)


def test_tokenizer_source_model_and_base(tm, tmp_path):
    from transformers import AutoModelForCausalLM

    A, B, Z = _load(tm["a"]), _load(tm["b"]), _load(tm["base"])
    va, vb = _vocab(tm["a"]), _vocab(tm["b"])
    two = [{"model": tm["a"], "parameters": {"weight": 0.5}}, {"model": tm["b"], "parameters": {"weight": 0.5}}]
    out = _merge({"models": two, "merge_method": "linear", "tokenizer_source": tm["b"]}, tmp_path / "b").out
    v = _vocab(out)
    assert v == vb and json.loads((out / "config.json").read_text())["vocab_size"] == 98
    got = _load(out)
    for name in VOCAB:
        E = got[name]
        assert torch.equal(E[v["<|b1|>"]], B[name][vb["<|b1|>"]])  # only in B
        torch.testing.assert_close(E[v["<|shared|>"]], 0.5 * A[name][va["<|shared|>"]] + 0.5 * B[name][vb["<|shared|>"]],
                                   rtol=0, atol=1e-7)
        torch.testing.assert_close(E[:96], 0.5 * A[name][:96] + 0.5 * B[name][:96], rtol=0, atol=1e-7)
    assert "<|a1|>" not in v
    AutoModelForCausalLM.from_pretrained(str(out))

    cfg = {"models": two, "merge_method": "task_arithmetic", "base_model": tm["base"], "tokenizer_source": "base"}
    out = _merge(cfg, tmp_path / "base").out
    assert _vocab(out) == _vocab(tm["base"]) and json.loads((out / "config.json").read_text())["vocab_size"] == 96
    got = _load(out)
    for name in VOCAB:
        want = Z[name] + 0.5 * (A[name][:96] - Z[name]) + 0.5 * (B[name][:96] - Z[name])
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-7)
    assert AutoModelForCausalLM.from_pretrained(str(out)).lm_head.weight.shape == (96, 40)


def test_tied_embeddings_stay_tied(tmp_path):
    from transformers import AutoModelForCausalLM

    m = mkcases.make_token_models(tmp_path / "models", tied=True)
    cfg, _ = mkcases.token_cases(m)["union_task_arithmetic"]
    out = _merge(cfg, tmp_path / "o").out
    got = _load(out)
    assert "lm_head.weight" not in got and json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    v, vb = _vocab(out), _vocab(m["b"])
    assert torch.equal(got["model.embed_tokens.weight"][v["<|b1|>"]], _load(m["b"])["model.embed_tokens.weight"][vb["<|b1|>"]])
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.lm_head.weight.shape == (99, 40)


@pytest.mark.parametrize("name", ["union_task_arithmetic", "union_tokens_pad_linear"])
def test_same_rows_as_mergekit(name, tm, tmp_path):
    pytest.importorskip("mergekit")
    cfg, expect = mkcases.token_cases(tm)[name]
    mkcases.run_mergekit(cfg, tmp_path / "mk")
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    from weightops.mergekit_compat import mergekit_merge

    mergekit_merge(tmp_path / "c.yml", tmp_path / "wo", quiet=True, block_size=1000)
    wo = mkcases.load(tmp_path / "wo")
    mk, info = mkcases.align_by_token(tmp_path / "mk", tmp_path / "wo", mkcases.load(tmp_path / "mk"))
    r = mkcases.compare(mk, wo)
    r.update(info)
    assert mkcases.ok(expect, r), r
    assert json.loads((tmp_path / "mk" / "config.json").read_text())["vocab_size"] == \
        json.loads((tmp_path / "wo" / "config.json").read_text())["vocab_size"]


def test_named_chat_templates_render_as_mergekits():
    pytest.importorskip("mergekit")
    import importlib.resources

    from mergekit._data import chat_templates
    from transformers.utils.chat_template_utils import render_jinja_template

    from weightops.tokenizer_merge import CHAT_TEMPLATES

    convs = [[{"role": "user", "content": "Hi there"}], mkcases.CONVERSATION,
             [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " A "}],
             [{"role": "system", "content": "S"}, {"role": "user_context", "content": "ctx"}, {"role": "user", "content": "u"}]]
    for name, ours in CHAT_TEMPLATES.items():
        theirs = importlib.resources.files(chat_templates).joinpath(name + ".jinja").read_text()
        for conv in convs:
            for gen in (False, True):
                kw = dict(conversations=[conv], add_generation_prompt=gen, bos_token="<s>", eos_token="</s>")
                try:
                    want = render_jinja_template(chat_template=theirs, **kw)[0]
                except Exception as e:  # noqa: BLE001  (mistral refuses some role orders: so must ours)
                    with pytest.raises(type(e)):
                        render_jinja_template(chat_template=ours, **kw)
                    continue
                assert render_jinja_template(chat_template=ours, **kw)[0] == want, (name, conv, gen)


def _with_template(src: str, dst: Path, template: str | None) -> str:
    shutil.copytree(src, dst)
    if template is not None:
        (dst / "chat_template.jinja").write_text(template)
    return str(dst)


def test_chat_template(tm, tmp_path):
    from transformers import AutoTokenizer

    from weightops.mergekit_compat import MergekitError
    from weightops.tokenizer_merge import CHAT_TEMPLATES

    # chat_template alone: the base's tokenizer, re-saved with it; rows and vocab_size untouched
    one = [{"model": tm["a"], "parameters": {"weight": 1.0}}]
    cfg = {"models": [{"model": tm["base"], "parameters": {"weight": 1.0}}], "merge_method": "linear",
           "chat_template": "llama3"}
    out = _merge(cfg, tmp_path / "named").out
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == CHAT_TEMPLATES["llama3"] and tok.get_vocab() == _vocab(tm["base"])
    assert torch.equal(_load(out)["lm_head.weight"], _load(tm["base"])["lm_head.weight"])
    inline = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    cfg = {"models": one, "merge_method": "task_arithmetic", "base_model": tm["base"], "tokenizer_source": "union",
           "chat_template": inline}
    out = _merge(cfg, tmp_path / "inline").out
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"
    assert "<|a1|>" in tok.get_vocab()
    # auto: the template most inputs have
    x, y = "{{ 'X' }}{% for m in messages %}{{ m['content'] }}{% endfor %}", "{{ 'Y' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ms = {n: _with_template(tm[n], tmp_path / n, t) for n, t in (("base", y), ("a", x), ("b", x))}
    cfg = {"models": [{"model": ms["a"], "parameters": {"weight": 0.5}}, {"model": ms["b"], "parameters": {"weight": 0.5}}],
           "merge_method": "task_arithmetic", "base_model": ms["base"], "tokenizer_source": "base", "chat_template": "auto"}
    out = _merge(cfg, tmp_path / "auto").out
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == x
    # the same config through the CLI (YAML only): the card lists the tokenizer notes
    from typer.testing import CliRunner

    from weightops.cli import app

    (tmp_path / "c.yml").write_text(yaml.safe_dump(dict(cfg, chat_template="mistral")))
    r = CliRunner().invoke(app, ["run", str(tmp_path / "c.yml"), str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    assert AutoTokenizer.from_pretrained(str(tmp_path / "cli")).chat_template == CHAT_TEMPLATES["mistral"]
    assert "chat_template: mistral" in (tmp_path / "cli" / "README.md").read_text()
    for bad in ("chatml2", "{{ x }}"):
        with pytest.raises(MergekitError, match="chat_template"):
            _merge(dict(cfg, chat_template=bad), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_vocabulary_mismatch_explains_the_options(tm, tmp_path, monkeypatch, capsys):
    from weightops.mergekit_compat import MergekitError

    cfg = {"models": [{"model": tm["a"], "parameters": {"weight": 1.0}}], "merge_method": "task_arithmetic",
           "base_model": tm["base"]}
    with pytest.raises(MergekitError, match=r"vocabularies differ: set `tokenizer_source: union`"):
        _merge(cfg, tmp_path / "o")
    from weightops.cli import main

    monkeypatch.setattr(sys, "argv", ["weightops", "merge", tm["a"], tm["b"], "--base", tm["base"], "--method",
                                      "task_arithmetic", "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("error:") == 1, err
    assert "vocabularies differ" in err and "tokenizer_source: union" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("tokenizer, match", [
    ({"tokens": {"<x>": {"force": True}}}, "needs a 'source'"),
    ({"tokens": {"<x>": {"source": "/nowhere/model"}}}, "not a model of the config"),
    ({"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
    ({"tokens": {"<x>": {"source": {"kind": "model_token", "model": "M", "token_id": 1, "token": "a"}}}}, "exactly one"),
    ({"tokens": {"<|b1|>": {"source": "A", "force": True}}}, "has no token '<|b1|>'"),
    ({"source": "union", "extra": 1}, "not supported"),
])
def test_bad_tokenizer_settings(tokenizer, match, tm, tmp_path):
    from weightops.mergekit_compat import MergekitError

    def fill(x):
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        return {"A": tm["a"], "M": tm["a"]}.get(x, x) if isinstance(x, str) else x
    cfg = {"models": [{"model": tm["a"], "parameters": {"weight": 1.0}}, {"model": tm["b"], "parameters": {"weight": 1.0}}],
           "merge_method": "task_arithmetic", "base_model": tm["base"], "tokenizer": fill(tokenizer)}
    with pytest.raises(MergekitError, match=match):
        _merge(cfg, tmp_path / "o")
    with pytest.raises(MergekitError, match="either 'tokenizer_source' or 'tokenizer'"):
        _merge(dict(cfg, tokenizer_source="union"), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_same_size_different_tokenizers_are_noted(tm, tmp_path):
    """Without tokenizer_source rows are merged by id (as mergekit); tokenizers that disagree on ids are reported."""
    other = tmp_path / "other"
    shutil.copytree(tm["base"], other)
    write_tokenizer(other, size=95, added=["<|x|>"])  # 96 tokens, the 96th is another token
    cfg = {"models": [{"model": str(other), "parameters": {"weight": 1.0}}], "merge_method": "task_arithmetic",
           "base_model": tm["base"]}
    res = _merge(cfg, tmp_path / "o")
    assert any("give 1 token/id pair(s) differently" in n or "token/id pair(s) differently" in n for n in res.warnings), res.warnings
    res = _merge(dict(cfg, models=[{"model": tm["base"], "parameters": {"weight": 1.0}}]), tmp_path / "same")
    assert not any("differently" in n for n in res.warnings)


def test_tokenizer_and_vocab_size_that_disagree(tm, tmp_path):
    """A base tokenizer with tokens past vocab_size loses them (BPE, as mergekit's stripped tokenizer); one with
    fewer tokens than rows gives one row per token (as mergekit), noted."""
    big = tmp_path / "big"
    shutil.copytree(tm["base"], big)
    write_tokenizer(big, added=["<|x|>", "<|y|>"])  # 98 tokens, 96 rows
    cfg = {"models": [{"model": tm["a"], "parameters": {"weight": 1.0}}], "merge_method": "task_arithmetic",
           "base_model": str(big), "tokenizer_source": "base", "dtype": "float32", "out_dtype": "float32"}
    out = _merge(cfg, tmp_path / "o").out
    v = _vocab(out)
    assert len(v) == 96 and "<|x|>" not in v and v == _vocab(tm["base"])
    if importlib.util.find_spec("mergekit") is not None:  # a test dependency: compare with it where installed
        mkcases.run_mergekit(cfg, tmp_path / "mk")
        mk, info = mkcases.align_by_token(tmp_path / "mk", out, mkcases.load(tmp_path / "mk"))
        r = mkcases.compare(mk, mkcases.load(out))
        r.update(info)
        assert mkcases.ok("exact", r), r
    small = tmp_path / "small"
    shutil.copytree(tm["base"], small)
    write_tokenizer(small, size=94)  # 94 tokens, 96 rows
    res = _merge(dict(cfg, base_model=str(small)), tmp_path / "s")
    assert _load(res.out)["lm_head.weight"].shape == (94, 40) and any("94 rows where" in n for n in res.warnings)
    assert json.loads((res.out / "config.json").read_text())["vocab_size"] == 94
