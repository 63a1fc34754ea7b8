"""Model cards: the README.md (YAML front matter + text) the Hugging Face hub shows for an output.

Every model-writing command writes one through the streaming engine (as mergekit
does): front matter with `base_model` (the inputs that are hub ids, or the local
paths when none is), `tags: [merge, weightops]` and `library_name: transformers`;
then the method, the inputs (hub id, revision and commit where known) and the
exact command or mergekit config that reproduces the output. `--no-card` (or
`with weightops.card.disabled():` in Python) skips it.
"""
from __future__ import annotations

import contextlib
import contextvars
import shlex

import yaml

_ENABLED = contextvars.ContextVar("weightops_card", default=True)


@contextlib.contextmanager
def disabled(flag: bool = True):
    """No model card for outputs written inside this block (when `flag`)."""
    tok = _ENABLED.set(not flag and _ENABLED.get())
    try:
        yield
    finally:
        _ENABLED.reset(tok)


def enabled() -> bool:
    return _ENABLED.get()


def _ref(inp: dict) -> str:
    h = inp.get("hub")
    if h:
        rev = f"@{h['revision']}" if h.get("revision") not in (None, "main") else ""
        return h["repo_id"] + rev
    return inp.get("ref") or inp.get("path", "?")


def _link(inp: dict) -> str:
    h = inp.get("hub")
    if h:
        commit = f" (revision {h['revision']}, commit {h['commit'][:10]})" if h.get("commit") else ""
        return f"[{h['repo_id']}](https://huggingface.co/{h['repo_id']}){commit}"
    return f"`{inp.get('ref') or inp.get('path', '?')}`"


def render(manifest: dict, name: str) -> str:
    """README.md text for an output, from its manifest (method, inputs, command, mergekit config)."""
    inputs = manifest.get("inputs") or []
    mk = manifest.get("mergekit") or {}
    hub_ids = [i["hub"]["repo_id"] for i in inputs if i.get("hub")]
    base_model = list(dict.fromkeys(hub_ids)) or list(dict.fromkeys(_ref(i) for i in inputs))
    meta = {"base_model": base_model, "library_name": "transformers", "tags": ["merge", "weightops"]}
    method = manifest.get("method", "?")
    base = [i for i in inputs if i.get("role") == "base"]
    base_text = f", with {_link(base[0])} as the base" if base else ""
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", f"# {name}", "",
             "This model was written by [weightops](https://pypi.org/project/weightops/) from the weights of other "
             "models, streaming tensor by tensor.", "", "## Method", "",
             f"`{mk.get('merge_method', method)}`{base_text}."]
    params = manifest.get("params")
    if params:
        lines += ["", "Parameters: " + ", ".join(f"`{k}={v}`" for k, v in params.items()) + "."]
    others = [i for i in inputs if i.get("role") != "base"]
    if others:
        lines += ["", "## Inputs", ""] + [f"* {_link(i)}" for i in others]
    if mk.get("config_yaml"):
        lines += ["", "## Configuration", "", "The mergekit configuration that produced this model "
                  "(`weightops run CONFIG OUT`, or `mergekit-yaml CONFIG OUT`):", "", "```yaml",
                  mk["config_yaml"].rstrip(), "```"]
    cmd = manifest.get("command")
    if cmd:
        lines += ["", "## Command", "", "```sh", shlex.join(str(c) for c in cmd), "```"]
    notes = mk.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in notes]
    lines += ["", f"weightops {manifest.get('weightops_version', '')}; `weightops.json` next to the weights lists "
              "every input file's sha256 and every output tensor's.", ""]
    return "\n".join(lines)
