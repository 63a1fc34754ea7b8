"""Tokenizers in mergekit configs: the output vocabulary, each model's vocabulary rows aligned to it
token by token, and the chat template (mergekit 0.1.5's `tokenizer_source`, `tokenizer:` and
`chat_template`, with its meanings; YAML only, run by `weightops run CONFIG OUT`).

    tokenizer_source: union            # or base, or a model (path or hub id); or, with per-token settings:
    tokenizer:
      source: union                    # the default
      tokens:
        "<|im_start|>": {source: org/chat-model, force: true}     # that model's row of the token, for every model
        "<|new|>": {source: {kind: zero}}
        "<|alias|>": {source: {kind: model_token, model: org/a, token: "<|x|>"}}   # or token_id: 7
      pad_to_multiple_of: 64
    chat_template: chatml              # alpaca, chatml, exaone, llama3, mistral, auto, or an inline Jinja template

The output vocabulary:
- `base`: the base model's tokenizer (the first model of the config without a base_model), less any
  token whose id is past the base's vocabulary size (config.json `vocab_size`);
- `union`: the base's tokenizer plus every other model's tokens it lacks: first the ordinary tokens,
  then the added tokens with their settings (special or not; the first model's where two differ),
  models in the order the config names them, each in id order; tokens past a model's vocabulary size
  are left out;
- a model: its tokenizer as it is;
then the tokens named under `tokens:` that it lacks are added.

Rows. Every tensor whose rows are tokens (`layers.is_vocabulary`: embed_tokens, lm_head, ...) of each
input model is rebuilt in the output's order: row j is the model's own row of token j. Where the model
lacks token j, or the token is listed with `force: true`, the row is the token's default, the same for
every input of that tensor:
- a `tokens:` source: the token's row in a model (`source: MODEL`), a given row of a model
  (`kind: model_token`, by `token_id` or by `token` in that model's vocabulary), or zeros (`kind: zero`);
- otherwise: the row of the one input that has the token; zeros when no input has it; the base's row
  when the base is an input and has it; else the mean of the rows of the inputs that have it.
The merge method then merges the aligned rows like any other tensor, so a token only one model knows
comes out as that model's row under every method that returns the inputs' common value (the others,
and the base, hold the same row). Rows past the vocabulary (`pad_to_multiple_of`) are each input's
mean row. config.json `vocab_size` is set to the number of rows; tied embeddings stay tied (a model
without lm_head gives its embed_tokens, aligned the same way).

Streaming: a model's aligned rows are read a block of rows at a time (runs of consecutive source rows
are one read each; default rows are read from their source models), never the whole matrix.

Where weightops differs from mergekit 0.1.5 (docs/merging.md): the union's new tokens are in config
order (mergekit's follow Python set and dict order, so their ids can change from run to run; the rows
of every token are the same); without base_model, `base` is the first model (mergekit: any one); a
token id past a model's vocabulary counts as missing (mergekit fails); a `tokens:` entry without a
source is refused (mergekit fails when it is used). The named chat templates render as mergekit's do.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from weightops.errors import WeightopsError

# What a tokenizer is made of: replaced as a whole in the output when the tokenizer is rebuilt.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")
TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}

# mergekit 0.1.5's named chat templates (mergekit/_data/chat_templates), written here to render the same
# text under transformers' chat-template environment (trim_blocks, lstrip_blocks), whitespace included:
# tests/soup/test_tokenizer_merge.py renders both on several conversations.
CHAT_TEMPLATES = {
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": ("{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
               "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "mistral": ("{% if messages and messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
                "{% set turns = messages[1:] %}{% else %}{% set sys = none %}{% set turns = messages %}{% endif %}"
                "{{ bos_token }}{% for m in turns %}"
                "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('After the optional system "
                "message, conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
                "{% if m['role'] == 'user' %}{{ ' [INST] ' + (sys + '\\n\\n' if loop.first and sys is not none else '') + "
                "m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
                "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an "
                "initial optional system message!') }}{% endif %}{% endfor %}"),
    "alpaca": ("{% set sys = messages | selectattr('role', 'equalto', 'system') | list %}"
               "{{ (sys | last).content | trim if sys else '' }}{{ '\\n\\n' }}"
               "{% set heads = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'} %}"
               "{% for m in messages %}{% if m['role'] in heads %}{{ heads[m['role']] + '\\n' + (m['content'] | trim) }}"
               "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endif %}{% endfor %}"
               "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}"),
    "exaone": ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
               "{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif %}{{ '    [|' + m['role'] + '|]' + m['content'] + '\\n' }}"
               "{{ '        \\n\\n' if m['role'] == 'user' else '        [|endofturn|]\\n\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '    [|assistant|]\\n' }}{% endif %}"),
}


def _error(msg: str) -> WeightopsError:
    from weightops.mergekit_compat import MergekitError

    return MergekitError(msg)


# --- settings ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenSetting:
    kind: str | None  # "model": the token's row in `model`; "model_token": row token_id / token of `model`; "zero"
    model: str | None = None  # ref key
    token_id: int | None = None
    token: str | None = None
    force: bool = False


@dataclass
class Settings:
    source: str | None  # "union", "base", a model's ref key, or None (no vocabulary alignment)
    source_ref: tuple | None
    tokens: dict
    pad_to_multiple_of: int | None
    chat_template: str | None


def read_settings(cfg: dict) -> Settings:
    """`tokenizer_source` / `tokenizer:` / `chat_template` of a mergekit config, validated."""
    from weightops.mergekit_compat import parse_ref, ref_key

    if cfg.get("tokenizer_source") is not None and cfg.get("tokenizer") is not None:
        raise _error("a mergekit config has either 'tokenizer_source' or 'tokenizer', not both (as mergekit)")
    tk = cfg.get("tokenizer")
    tokens, pad = {}, None
    if tk is not None:
        if not isinstance(tk, dict):
            raise _error(f"'tokenizer' must be a mapping (source, tokens, pad_to_multiple_of), got {tk!r}")
        bad = sorted(set(tk) - TOKENIZER_KEYS)
        if bad:
            raise _error(f"tokenizer: key(s) not supported: {', '.join(bad)} (mergekit's are source, tokens, pad_to_multiple_of)")
        source = tk.get("source", "union")
        pad = tk.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise _error(f"tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
        raw = tk.get("tokens") or {}
        if not isinstance(raw, dict):
            raise _error("tokenizer.tokens must map each token to {source, force}")
        for tok, s in raw.items():
            tokens[str(tok)] = _token_setting(str(tok), s, parse_ref, ref_key)
    else:
        source = cfg.get("tokenizer_source")
    ref = None
    if source is not None and source not in ("union", "base"):
        ref = parse_ref(source, "tokenizer source")
        source = ref_key(ref)
    ct = cfg.get("chat_template")
    if ct is not None and not isinstance(ct, str):
        raise _error(f"chat_template must be a name or a Jinja template, got {ct!r}")
    return Settings(source, ref, tokens, pad, ct or None)


def _token_setting(tok: str, s, parse_ref, ref_key) -> TokenSetting:
    where = f"tokenizer.tokens[{tok!r}]"
    if not isinstance(s, dict):
        raise _error(f"{where} must be a mapping with 'source' and/or 'force'")
    bad = sorted(set(s) - {"source", "force"})
    if bad:
        raise _error(f"{where}: key(s) not supported: {', '.join(bad)}")
    force = s.get("force", False)
    if not isinstance(force, bool):
        raise _error(f"{where}.force must be true or false")
    src = s.get("source")
    if src is None:  # mergekit accepts it and fails once the token needs a row
        raise _error(f"{where} needs a 'source' (a model, {{kind: model_token, model, token_id | token}} or {{kind: zero}})")
    if isinstance(src, dict) and "kind" in src:
        kind = src["kind"]
        if kind == "zero":
            if set(src) != {"kind"}:
                raise _error(f"{where}.source: kind zero takes no other key")
            return TokenSetting("zero", force=force)
        if kind != "model_token":
            raise _error(f"{where}.source: unknown kind {kind!r} (model_token or zero)")
        bad = sorted(set(src) - {"kind", "model", "token_id", "token"})
        if bad or "model" not in src:
            raise _error(f"{where}.source: kind model_token takes model and token_id or token" +
                         (f" (not {', '.join(bad)})" if bad else ""))
        tid, t = src.get("token_id"), src.get("token")
        if (tid is None) == (t is None):
            raise _error(f"{where}.source: give exactly one of token_id and token")
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
            raise _error(f"{where}.source.token_id must be a non-negative integer, got {tid!r}")
        return TokenSetting("model_token", ref_key(parse_ref(src["model"], where)), tid, None if t is None else str(t), force)
    return TokenSetting("model", ref_key(parse_ref(src, where)), force=force)


# --- tokenizers ----------------------------------------------------------------------------------------
def _model_dir(models, key: str) -> Path:
    src = models.sources[key]
    return Path((getattr(src, "base", None) or src).path)


def has_tokenizer(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json",
                                                                 "vocab.txt", "spiece.model"))


def load_tokenizer(path: Path, what: str):
    """A fast tokenizer from a local directory; never runs code from it (trust_remote_code=False)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds; each is the user's to fix)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise _error(f"{what}: cannot load the tokenizer in {path} ({e.__class__.__name__}: {first})") from None


def vocab_limit(models, key: str) -> int | None:
    """A model's vocabulary size: config.json `vocab_size`, else the rows of its token embeddings."""
    from weightops.layers import is_vocabulary

    v = (models.configs.get(key) or {}).get("vocab_size")
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    for name, info in models.sources[key].infos.items():
        if is_vocabulary(name) and len(info.shape) >= 1:
            return int(info.shape[0])
    return None


def _reload(tok, edit=None):
    """A copy of a tokenizer through save_pretrained / from_pretrained (optionally editing its files)."""
    with tempfile.TemporaryDirectory(prefix="weightops-tok-") as d:
        tok.save_pretrained(d)
        if edit is not None:
            edit(Path(d))
        return load_tokenizer(Path(d), "tokenizer")


def _strip(tok, limit: int, what: str):
    """The tokenizer without tokens whose id is `limit` or more (mergekit's get_stripped_tokenizer): BPE only."""
    unused = {t for t, i in tok.get_vocab().items() if i >= limit}
    if not unused:
        return tok

    def edit(d: Path):
        f = d / "tokenizer.json"
        doc = json.loads(f.read_text(encoding="utf-8"))
        if doc.get("model", {}).get("type") != "BPE":
            raise _error(f"{what}: its tokenizer has {len(unused)} token(s) past vocab_size {limit} and is a "
                         f"{doc.get('model', {}).get('type')} tokenizer; they can be dropped from BPE tokenizers only (as mergekit)")
        doc["added_tokens"] = [e for e in doc.get("added_tokens", []) if e["id"] < limit]
        for t in unused:
            doc["model"]["vocab"].pop(t, None)

        def keep(m):
            parts = m.split(" ") if isinstance(m, str) else list(m)
            return not any(p in unused for p in parts)
        doc["model"]["merges"] = [m for m in doc["model"].get("merges", []) if keep(m)]
        f.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
        c = d / "tokenizer_config.json"
        if c.is_file():
            conf = json.loads(c.read_text(encoding="utf-8"))
            if isinstance(conf.get("added_tokens_decoder"), dict):
                conf["added_tokens_decoder"] = {k: v for k, v in conf["added_tokens_decoder"].items() if int(k) < limit}
                c.write_text(json.dumps(conf, ensure_ascii=False), encoding="utf-8")
    return _reload(tok, edit)


def _added_settings(a) -> tuple:
    return (a.content, a.single_word, a.lstrip, a.rstrip, a.normalized, a.special)


def union_tokenizer(base_tok, toks: dict, limits: dict, notes: list[str]):
    """mergekit's build_union_tokenizer, in config order: the base's tokenizer, then every model's new
    ordinary tokens, then every model's added tokens (first settings win)."""
    base_vocab = base_tok.get_vocab()
    added, plain, clash = {}, {}, []
    for key, tok in toks.items():
        limit = limits.get(key) or len(tok.get_vocab())
        for i, a in sorted(tok.added_tokens_decoder.items()):
            if i >= limit:
                continue
            prev = added.setdefault(a.content, a)
            if prev is not a and _added_settings(prev) != _added_settings(a) and a.content not in clash:
                clash.append(a.content)
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < limit and t not in base_vocab:
                plain.setdefault(t, None)
    if clash:
        notes.append(f"tokenizer: {len(clash)} added token(s) have different settings in different models "
                     f"({', '.join(repr(c) for c in clash[:3])}); the first model's are used (as mergekit)")
    res = _reload(base_tok)
    new_plain = [t for t in plain if t not in added]
    if new_plain:
        res.add_tokens(new_plain)
    if added:
        res.add_tokens(list(added.values()))
    return res


def resolve_chat_template(value: str, tokenizers) -> str | None:
    """mergekit's _set_chat_template: 'auto' (the most common template of the inputs, None when they have
    none), a named template, or an inline Jinja template."""
    if value == "auto":
        found = []
        for tok in tokenizers:
            t = getattr(tok, "chat_template", None)
            if isinstance(t, dict):
                t = t.get("default")
            if t:
                found.append(t.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        if value in CHAT_TEMPLATES:
            return CHAT_TEMPLATES[value]
        raise _error(f"chat_template '{value}' is not a named template ({', '.join(sorted(CHAT_TEMPLATES))}, auto) "
                     "nor a Jinja template")
    if len(value) < 20 or "{" not in value:
        raise _error(f"chat_template {value!r} is not a valid Jinja chat template")
    return value


# --- the plan ------------------------------------------------------------------------------------------
class TokenizerPlan:
    """The output tokenizer (saved to a temporary directory until the output is written) and, when the
    vocabulary is aligned, each model's map from output token id to its own row."""

    def __init__(self, tokenizer, perms: dict | None, vocabs: dict, settings: Settings, base_key: str | None,
                 notes: list[str]):
        self.tokenizer, self.perms, self.vocabs, self.settings = tokenizer, perms, vocabs, settings
        self.base_key, self.notes = base_key, notes
        vocab = tokenizer.get_vocab()
        self.vocab = vocab
        self.n_tokens = len(vocab)
        self.size = self.n_tokens
        pad = settings.pad_to_multiple_of
        if pad and self.size % pad:
            self.size = (self.size // pad + 1) * pad
        self.tokens = [None] * self.n_tokens
        for t, i in vocab.items():
            if not 0 <= i < self.n_tokens or self.tokens[i] is not None:
                raise _error(f"tokenizer: the output vocabulary's ids are not 0..{self.n_tokens - 1} (token {t!r} has "
                             f"id {i}); its rows cannot be laid out")
            self.tokens[i] = t
        self.dir = Path(tempfile.mkdtemp(prefix="weightops-tokenizer-"))
        try:
            tokenizer.save_pretrained(str(self.dir))
        except BaseException:
            self.cleanup()
            raise

    @property
    def aligned(self) -> bool:
        return self.perms is not None

    def files(self) -> list[Path]:
        return sorted(p for p in self.dir.iterdir() if p.is_file())

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def rows(self, ins: list[tuple[str, str]], sources: dict, base_key: str | None, out_name: str) -> "AlignedRows":
        return AlignedRows(self, ins, sources, base_key, out_name)


def plan_tokenizer(cfg: dict, models, base_key: str | None, keys: list[str], notes: list[str]) -> TokenizerPlan | None:
    """The output tokenizer of a config and the token maps (None: no tokenizer setting, the base's files
    are copied). `keys`: every model of the config, in config order."""
    s = read_settings(cfg)
    if s.source is None and s.chat_template is None:
        return None
    donor = base_key if base_key is not None else keys[0]
    donor_dir = _model_dir(models, donor)
    if not has_tokenizer(donor_dir):
        what = "tokenizer_source" if s.source is not None else "chat_template"
        raise _error(f"{what}: {'the base model' if base_key else 'the first model'} {donor} has no tokenizer files "
                     f"in {donor_dir}")
    if s.source is None:  # chat_template alone: the donor's tokenizer, re-saved with the template (as mergekit)
        tok = load_tokenizer(donor_dir, donor)
        others = [load_tokenizer(_model_dir(models, k), k) for k in keys
                  if s.chat_template == "auto" and k != donor and has_tokenizer(_model_dir(models, k))]
        _set_template(tok, s.chat_template, [tok] + others, notes)
        return TokenizerPlan(tok, None, {}, s, base_key, notes)
    limits = {k: vocab_limit(models, k) for k in keys}
    base_tok = load_tokenizer(donor_dir, donor)
    if limits[donor] is not None:
        base_tok = _strip(base_tok, limits[donor], donor)
    toks = {donor: base_tok}
    for k in keys:
        if k == donor:
            continue
        d = _model_dir(models, k)
        if has_tokenizer(d):
            toks[k] = load_tokenizer(d, k)
        else:
            notes.append(f"tokenizer: {k} has no tokenizer files; its rows are read as the base's vocabulary (as mergekit)")
    if s.source == "base":
        out = _reload(base_tok)  # a copy: the tokens below are added to it
    elif s.source == "union":
        out = union_tokenizer(base_tok, toks, limits, notes)
    else:
        d = Path(str(s.source_ref[0]))
        if s.source in models.sources:
            d = _model_dir(models, s.source)
        elif not d.is_dir():
            from weightops import hub

            d = hub.resolve(s.source_ref[0])
        if not has_tokenizer(d):
            raise _error(f"tokenizer_source: {s.source} has no tokenizer files in {d}")
        out = toks.get(s.source) if s.source in toks and s.source != donor else load_tokenizer(d, s.source)
        out = _reload(out)  # a copy: the tokens below are added to it
    extra = [t for t in s.tokens if t not in out.get_vocab()]
    if extra:
        out.add_tokens(extra)
    if s.chat_template is not None:
        _set_template(out, s.chat_template, list(toks.values()), notes)
    vocab_out = out.get_vocab()
    perms, vocabs = {}, {}
    for k in keys:
        mv = toks[k].get_vocab() if k in toks else base_tok.get_vocab()
        if k in toks:
            vocabs[k] = mv
        limit = limits[k] if limits[k] is not None else len(mv)
        p = np.full(len(vocab_out), -1, dtype=np.int64)
        for t, j in vocab_out.items():
            i = mv.get(t)
            if i is not None and i < limit and 0 <= j < len(p):
                p[j] = i
        perms[k] = p
    for t, st in s.tokens.items():
        if st.model is not None and st.model not in perms:
            raise _error(f"tokenizer.tokens[{t!r}]: source model {st.model} is not a model of the config")
    how = {"union": "the union of the models' tokenizers", "base": "the base's tokenizer"}.get(s.source, f"{s.source}'s tokenizer")
    plan = TokenizerPlan(out, perms, vocabs, s, base_key, notes)
    notes.append(f"tokenizer: {how}, {plan.n_tokens} tokens" + (f", {plan.size} rows (pad_to_multiple_of "
                                                                 f"{s.pad_to_multiple_of})" if plan.size != plan.n_tokens else ""))
    if limits[donor] is not None and plan.size < limits[donor]:
        notes.append(f"tokenizer: {plan.size} rows where {donor} has {limits[donor]} (its vocab_size counts rows its "
                     "tokenizer does not use; as mergekit, the output has one row per token)")
    nowhere = np.all(np.stack(list(perms.values())) < 0, axis=0)
    missing = [t for j in np.nonzero(nowhere)[0].tolist() if (t := plan.tokens[j]) not in s.tokens]
    if missing:
        notes.append(f"tokenizer: {len(missing)} token(s) in no model's vocabulary get zero rows (no `tokens:` "
                     f"source): {', '.join(repr(t) for t in missing[:3])}")
    return plan


def _set_template(tok, value: str, tokenizers, notes: list[str]) -> None:
    t = resolve_chat_template(value, tokenizers)
    if t is None:
        notes.append("chat_template auto: no input model has a chat template; none set")
        return
    tok.chat_template = t
    notes.append(f"chat_template: {value if len(value) < 40 else 'inline template'}")


# --- rows ------------------------------------------------------------------------------------------------
def _runs(rows: np.ndarray):
    """(position, first source row, length) of each run of consecutive non-negative source rows."""
    idx = np.nonzero(rows >= 0)[0]
    if not len(idx):
        return
    brk = np.nonzero((np.diff(idx) != 1) | (np.diff(rows[idx]) != 1))[0] + 1
    for seg in np.split(idx, brk):
        yield int(seg[0]), int(rows[seg[0]]), len(seg)


class AlignedRows:
    """One vocabulary tensor of every input of an output tensor, in the output's token order: input i's
    flat elements [start, stop) through `reader(i)`, in fp32, a block of rows at a time."""

    STAT_BLOCK = 1 << 22  # elements per read when averaging rows for padding

    def __init__(self, plan: TokenizerPlan, ins: list[tuple[str, str]], sources: dict, base_key: str | None,
                 out_name: str):
        self.plan, self.out_name = plan, out_name
        self.srcs = [(sources[k], nm) for k, nm in ins]
        shapes = [tuple(sources[k].infos[nm].shape) for k, nm in ins]
        if any(len(sh) == 0 for sh in shapes) or len({sh[1:] for sh in shapes}) != 1:
            raise _error(f"'{out_name}': the tensors to align by token differ beyond their rows: "
                         + ", ".join(f"{list(sh)} in {k}" for sh, (k, _) in zip(shapes, ins)))
        self.shape = (plan.size, *shapes[0][1:])
        self.width = math.prod(shapes[0][1:])
        V = plan.n_tokens
        keys = [k for k, _ in ins]
        self.own = []
        for (k, _), sh in zip(ins, shapes):
            p = plan.perms[k].copy()
            p[p >= sh[0]] = -1
            self.own.append(p)
        present = np.stack([p >= 0 for p in self.own]) if self.own else np.zeros((0, V), bool)
        forced = np.zeros(V, dtype=bool)
        for t, st in plan.settings.tokens.items():
            if st.force and t in plan.vocab:
                forced[plan.vocab[t]] = True
        need = forced | ~present.all(axis=0)
        bidx = keys.index(base_key) if base_key is not None and base_key in keys else None
        self.default: dict[int, list[tuple[int, int]]] = {}  # token id -> [(input, row)] averaged; [] = zeros
        for j in np.nonzero(need)[0].tolist():
            tok = plan.tokens[j]
            st = plan.settings.tokens.get(tok)
            if st is not None:
                self.default[j] = self._from_setting(st, tok, j, keys, shapes)
                continue
            have = np.nonzero(present[:, j])[0].tolist()
            if len(have) == 1:
                self.default[j] = [(have[0], int(self.own[have[0]][j]))]
            elif not have:
                self.default[j] = []
            elif bidx is not None and present[bidx, j]:
                self.default[j] = [(bidx, int(self.own[bidx][j]))]
            else:
                self.default[j] = [(i, int(self.own[i][j])) for i in have]
        for p in self.own:
            p[forced] = -1
        self._cache_key, self._cache = None, {}
        self._means: dict[int, torch.Tensor] = {}

    def _from_setting(self, st: TokenSetting, tok: str, j: int, keys, shapes) -> list[tuple[int, int]]:
        if st.kind == "zero":
            return []
        if st.model not in keys:
            raise _error(f"tokenizer.tokens[{tok!r}]: '{self.out_name}' needs a row from {st.model}, which is not an "
                         f"input of that tensor ({', '.join(keys)})")
        i = keys.index(st.model)
        if st.kind == "model":
            if self.own[i][j] < 0:
                raise _error(f"tokenizer.tokens[{tok!r}]: {st.model} has no token {tok!r}")
            return [(i, int(self.own[i][j]))]
        row = st.token_id
        if row is None:
            vocab = self.plan.vocabs.get(st.model)
            if vocab is None or st.token not in vocab:
                raise _error(f"tokenizer.tokens[{tok!r}]: {st.model} has no token {st.token!r}")
            row = vocab[st.token]
        if row >= shapes[i][0]:
            raise _error(f"tokenizer.tokens[{tok!r}]: row {row} is past the {shapes[i][0]} rows of '{self.srcs[i][1]}' in {st.model}")
        return [(i, int(row))]

    def reader(self, i: int):
        return lambda start, stop: self.read(i, start, stop)

    def _row(self, i: int, r: int) -> torch.Tensor:
        src, nm = self.srcs[i]
        w = self.width
        x = src.read(nm, r * w, (r + 1) * w).float()
        src.release(nm, r * w, (r + 1) * w)
        return x

    def _default_row(self, j: int) -> torch.Tensor:
        got = self._cache.get(j)
        if got is None:
            spec = self.default.get(j, [])
            if not spec:
                got = torch.zeros(self.width, dtype=torch.float32)
            elif len(spec) == 1:
                got = self._row(*spec[0])
            else:  # mergekit: zeros + each row in input order, divided by the count, in fp32
                got = torch.zeros(self.width, dtype=torch.float32)
                for i, r in spec:
                    got = got + self._row(i, r)
                got = got / len(spec)
            self._cache[j] = got
        return got

    def _mean(self, i: int) -> torch.Tensor:
        if i not in self._means:
            V, w = self.plan.n_tokens, self.width
            step = max(1, self.STAT_BLOCK // max(w, 1))
            acc = torch.zeros(w, dtype=torch.float64)
            for r in range(0, V, step):
                acc += self.read(i, r * w, min(V, r + step) * w).reshape(-1, w).double().sum(0)
            self._means[i] = (acc / V).float()
        return self._means[i]

    def read(self, i: int, start: int, stop: int) -> torch.Tensor:
        w = self.width
        if stop <= start or w == 0:
            return torch.empty(0, dtype=torch.float32)
        r0, r1 = start // w, -(-stop // w)
        out = torch.empty((r1 - r0, w), dtype=torch.float32)
        V = self.plan.n_tokens
        hi = min(r1, V)
        if r0 < hi:
            if self._cache_key != (r0, hi):
                self._cache_key, self._cache = (r0, hi), {}
            rows = self.own[i][r0:hi]
            src, nm = self.srcs[i]
            for pos, first, n in _runs(rows):
                x = src.read(nm, first * w, (first + n) * w)
                out[pos:pos + n].copy_(x.reshape(n, w))
                src.release(nm, first * w, (first + n) * w)
            for pos in np.nonzero(rows < 0)[0].tolist():
                out[pos] = self._default_row(r0 + pos)
        if r1 > V:
            out[max(V, r0) - r0:] = self._mean(i)
        return out.reshape(-1)[start - r0 * w: stop - r0 * w]


# --- without a tokenizer setting ---------------------------------------------------------------------------
def _json_vocab(path: Path) -> dict | None:
    """token -> id of a tokenizer.json (model vocabulary and added tokens), without loading transformers."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        model = doc.get("model") or {}
        v = model.get("vocab")
        out = dict(v) if isinstance(v, dict) else {p[0]: i for i, p in enumerate(v or [])}
        for a in doc.get("added_tokens") or []:
            out[a["content"]] = a["id"]
        return out
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def same_vocabulary_note(models, keys: list[str]) -> str | None:
    """Without a tokenizer setting rows are merged by id, as mergekit does. A note when the models'
    tokenizer.json files give a token different ids within the rows they share (a silent misalignment
    otherwise: `tokenizer_source` aligns by token)."""
    first, first_bytes, first_vocab = None, b"", None
    for k in keys:
        f = _model_dir(models, k) / "tokenizer.json"
        if not f.is_file():
            continue
        if first is None:
            first, first_bytes = (k, f), f.read_bytes()
            continue
        if f.read_bytes() == first_bytes:
            continue
        if first_vocab is None:
            first_vocab = _json_vocab(first[1])
        other = _json_vocab(f)
        if first_vocab is None or other is None:
            continue
        n = min(vocab_limit(models, first[0]) or 0, vocab_limit(models, k) or 0)
        a = {t: i for t, i in first_vocab.items() if i < n}
        b = {t: i for t, i in other.items() if i < n}
        diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])
        if diff:
            return (f"the tokenizers of {first[0]} and {k} give {len(diff)} token/id pair(s) differently within the "
                    f"rows they share (e.g. {diff[0][0]!r} at {diff[0][1]}): rows are merged by id; set "
                    "`tokenizer_source` (union, base or a model) to align them by token")
    return None
