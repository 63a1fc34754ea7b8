"""Evaluators: model directory -> score, HIGHER IS BETTER, cached by content.

Every data-driven method (greedy and learned soups, interpolation sweeps,
DAREx-q search, learned masks) scores candidate models through one interface:

    Evaluator = Callable[[Path], float]

`make_evaluator(spec)` builds one from
- a Python callable (called with the model dir);
- "module:function" or "path/to/file.py:function" (imported, called with the dir);
- "cmd:<shell command>": `{model}` is replaced by the candidate's path (appended
  when absent); the last line the command prints is the score;
- "zoo:<task>[:<split>[:<limit>]]": `weightops.zoo.evaluate` accuracy (split
  defaults to validation: held-out data, never the test set);
- "seqcls:<file.csv|.jsonl>": accuracy on rows of (text, label) with
  transformers' AutoModelForSequenceClassification;
- "lm:<text file>": NEGATIVE perplexity (so higher is still better) with
  AutoModelForCausalLM.
Options go after `?`: "seqcls:val.csv?max_length=64&batch_size=16&tokenizer=DIR&limit=200",
"lm:wiki.txt?max_length=512&limit=50" (limit = rows / windows scored).

Scores are cached by (content key of the model, key of the spec): the content
key is the sha256 of the tensors' sha256s from a weightops manifest when there
is one (every weightops output has it), else of the weight files' bytes, plus
the model's config; the spec key includes the sha256 of every data file,
script or Python source the spec names, so editing them invalidates the cache.
Bare Python callables are cached only when given a `cache_key`.

In-memory states (`evaluate_state`): we chose ONE code path. The state is
written to a scratch directory (on /dev/shm when it exists) with the template's
config and tokenizer files and scored like any candidate, then deleted; every
evaluator therefore only ever sees a directory, and the cache still applies.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import parse_qsl

from weightops.errors import WeightopsError

Evaluator = Callable[[Path], float]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Files besides the weights that change what a model computes.
CONFIG_FILES = ("config.json", "adapter_config.json")
CACHE_VERSION = 1


# --- keys -----------------------------------------------------------------------------
def file_sha256(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _manifest_key(d: Path) -> str | None:
    p = d / "weightops.json"
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
        tensors = m["outputs"]["tensors"]
        shards = m["outputs"]["shards"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    # The manifest describes these shards only if they are all still there.
    if not shards or not all((d / s).is_file() for s in shards):
        return None
    rows = sorted((k, v["dtype"], v["shape"], v["sha256"]) for k, v in tensors.items())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def content_key(model) -> str:
    """sha256 naming what a model computes: its tensors (manifest or file bytes) and its config."""
    p = Path(model)
    if p.is_file():
        return file_sha256(p)
    if not p.is_dir():
        raise WeightopsError(f"{p}: no such model directory or file")
    h = hashlib.sha256()
    key = _manifest_key(p)
    if key is not None:
        h.update(b"manifest:" + key.encode())
    else:
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
        if not files:
            raise WeightopsError(f"{p}: no weight files (*.safetensors, *.bin) to evaluate")
        for f in files:
            h.update(f"{f.name}:{file_sha256(f)}\n".encode())
    for name in CONFIG_FILES:
        if (p / name).is_file():
            h.update(f"{name}:{file_sha256(p / name)}\n".encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """$WEIGHTOPS_CACHE/eval, else $XDG_CACHE_HOME/weightops/eval (~/.cache/weightops/eval)."""
    env = os.environ.get("WEIGHTOPS_CACHE")
    if env:
        return Path(env).expanduser() / "eval"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "weightops" / "eval"


# --- the evaluator object -------------------------------------------------------------
class CachedEvaluator:
    """An `Evaluator` with a score cache; `calls` counts real evaluations, `hits` cache hits."""

    def __init__(self, fn: Evaluator, spec_key: str | None, name: str, cache_dir=None, cache: bool = True, spec=None):
        self.fn, self.spec_key, self.name = fn, spec_key, name
        self.spec = spec if spec is not None else fn  # what a worker process rebuilds it from
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache = cache and spec_key is not None
        self.calls = self.hits = 0

    def __repr__(self) -> str:
        return f"Evaluator({self.name})"

    def _entry(self, model) -> Path:
        k = hashlib.sha256(f"{CACHE_VERSION}\n{self.spec_key}\n{content_key(model)}".encode()).hexdigest()
        return self.cache_dir / k[:2] / f"{k}.json"

    def cached(self, model) -> float | None:
        if not self.cache:
            return None
        e = self._entry(model)
        try:
            return float(json.loads(e.read_text())["score"])
        except (OSError, ValueError, KeyError):
            return None

    def __call__(self, model) -> float:
        model = Path(model)
        entry = self._entry(model) if self.cache else None
        if entry is not None and entry.is_file():
            try:
                score = float(json.loads(entry.read_text())["score"])
                self.hits += 1
                return score
            except (ValueError, KeyError):
                pass  # a corrupt entry is recomputed and overwritten
        t0 = time.perf_counter()
        score = self.fn(model)
        self.calls += 1
        try:
            score = float(score)
        except (TypeError, ValueError):
            raise WeightopsError(f"evaluator {self.name} returned {score!r} for {model}, not a number") from None
        if not math.isfinite(score):
            raise WeightopsError(f"evaluator {self.name} returned {score} for {model}; scores must be finite")
        if entry is not None:
            _write_json_atomic(entry, {"score": score, "spec": self.spec_key, "model": str(model),
                                       "seconds": round(time.perf_counter() - t0, 3)})
        return score


def _write_json_atomic(path: Path, obj) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs re-evaluation


def make_evaluator(spec, *, cache_dir=None, cache: bool = True, cache_key: str | None = None) -> CachedEvaluator:
    """An `Evaluator` from a callable or a spec string (see the module docstring)."""
    if isinstance(spec, CachedEvaluator):
        return spec
    if callable(spec):
        name = getattr(spec, "__qualname__", repr(spec))
        return CachedEvaluator(spec, f"callable:{cache_key}" if cache_key else None, name, cache_dir, cache, spec)
    if not isinstance(spec, str) or not spec.strip():
        raise WeightopsError(f"--eval must be a callable or a spec string, got {spec!r}")
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    builders = {"cmd": _cmd, "zoo": _zoo, "seqcls": _seqcls, "lm": _lm}
    if kind in builders and rest:
        fn, key = builders[kind](rest)
    elif rest and kind not in builders:
        fn, key = _python(kind, rest)
    else:
        raise WeightopsError(f"--eval '{spec}': expected module:function, file.py:function, cmd:<command>, "
                             "zoo:<task>[:<split>], seqcls:<file.csv|.jsonl> or lm:<text file>")
    return CachedEvaluator(fn, f"{key}|{cache_key or ''}", spec, cache_dir, cache, spec)


# --- builders: each returns (function, spec key) ---------------------------------------
def _python(module: str, func: str):
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise WeightopsError(f"--eval: no such file {module}")
        s = importlib.util.spec_from_file_location(f"_weightops_eval_{path.stem}", path)
        mod = importlib.util.module_from_spec(s)
        try:
            s.loader.exec_module(mod)
        except Exception as e:  # the user's file: report it in one line
            raise WeightopsError(f"--eval: importing {module} failed: {type(e).__name__}: {e}") from None
        source = path
    else:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise WeightopsError(f"--eval: cannot import module '{module}' ({e}); is it on PYTHONPATH?") from None
        source = Path(getattr(mod, "__file__", "") or "")
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise WeightopsError(f"--eval: '{module}' has no function '{func}'")
    src_hash = file_sha256(source) if source.is_file() else "?"
    return fn, f"python:{module}:{func}:{src_hash}"


def _cmd(command: str):
    # Scripts the command names are part of the key, so editing them invalidates the cache.
    try:
        tokens = shlex.split(command)
    except ValueError as e:
        raise WeightopsError(f"--eval cmd: cannot parse '{command}' ({e})") from None
    hashes = [f"{t}={file_sha256(t)}" for t in tokens if "{model}" not in t and os.path.isfile(t)]

    def run(model: Path) -> float:
        q = shlex.quote(str(model))
        line = command.replace("{model}", q) if "{model}" in command else f"{command} {q}"
        try:
            r = subprocess.run(line, shell=True, capture_output=True, text=True)
        except OSError as e:
            raise WeightopsError(f"--eval cmd: cannot run '{line}' ({e})") from None
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            raise WeightopsError(f"--eval cmd exited with {r.returncode} on {model}: {tail}")
        lines = [x for x in r.stdout.strip().splitlines() if x.strip()]
        try:
            return float(lines[-1].strip())
        except (IndexError, ValueError):
            raise WeightopsError(f"--eval cmd: the last line printed must be the score, got "
                                 f"{(lines or [''])[-1][:80]!r}") from None

    return run, f"cmd:{command}:{','.join(hashes)}"


def _options(rest: str) -> tuple[str, dict[str, str]]:
    target, _, query = rest.partition("?")
    return target, dict(parse_qsl(query, keep_blank_values=False))


def _int_opt(opts: dict, name: str, default):
    if name not in opts:
        return default
    try:
        return int(opts.pop(name))
    except ValueError:
        raise WeightopsError(f"--eval option {name} must be an integer") from None


def _no_more(opts: dict, kind: str):
    if opts:
        raise WeightopsError(f"--eval {kind}: unknown option(s) {', '.join(opts)}")


def _zoo(rest: str):
    parts = rest.split(":")
    task = parts[0]
    split = parts[1] if len(parts) > 1 and parts[1] else "validation"
    limit = int(parts[2]) if len(parts) > 2 and parts[2] else None
    from weightops.zoo.tasks import SPLITS, TASKS, load_task

    if task not in TASKS:
        raise WeightopsError(f"--eval zoo: unknown task '{task}'; tasks are {', '.join(TASKS)}")
    if split not in SPLITS:
        raise WeightopsError(f"--eval zoo: unknown split '{split}'; splits are {', '.join(SPLITS)}")
    data = load_task(task)[split][:limit]
    data_hash = hashlib.sha256(json.dumps(data).encode()).hexdigest()

    def run(model: Path) -> float:
        from weightops.zoo.evaluate import evaluate

        return evaluate(model, task, split, limit=limit)

    return run, f"zoo:{task}:{split}:{limit}:{data_hash}"


def read_labelled(path) -> list[tuple[str, object]]:
    """(text, label) rows of a CSV (header with text,label columns) or JSONL ({"text":..., "label":...})."""
    import csv

    p = Path(path)
    if not p.is_file():
        raise WeightopsError(f"--eval seqcls: no such file {p}")
    rows = []
    try:
        if p.suffix == ".jsonl":
            for i, line in enumerate(p.read_text().splitlines()):
                if line.strip():
                    r = json.loads(line)
                    rows.append((r["text"], r["label"]))
        elif p.suffix in (".csv", ".tsv"):
            with open(p, newline="") as f:
                for r in csv.DictReader(f, delimiter="\t" if p.suffix == ".tsv" else ","):
                    rows.append((r["text"], r["label"]))
        else:
            raise WeightopsError(f"--eval seqcls: {p} must be .csv, .tsv or .jsonl")
    except (KeyError, json.JSONDecodeError, TypeError) as e:
        raise WeightopsError(f"--eval seqcls: {p}: every row needs 'text' and 'label' ({type(e).__name__}: {e})") from None
    if not rows:
        raise WeightopsError(f"--eval seqcls: {p} has no rows")
    return rows


def _label_ids(labels: list, config) -> list[int]:
    """Integer labels as they are; names through the model's label2id."""
    out = []
    l2i = {str(k).lower(): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    for y in labels:
        s = str(y).strip()
        if s.lstrip("-").isdigit():
            out.append(int(s))
        elif s.lower() in l2i:
            out.append(l2i[s.lower()])
        else:
            raise WeightopsError(f"--eval seqcls: label {y!r} is neither an integer nor in the model's label2id {sorted(l2i)}")
    return out


def _tokenizer(model: Path, explicit: str | None):
    from transformers import AutoTokenizer

    src = explicit or model
    try:
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise WeightopsError(f"--eval: no tokenizer in {src} ({type(e).__name__}); pass ?tokenizer=DIR") from None


def _seqcls(rest: str):
    target, opts = _options(rest)
    rows = read_labelled(target)
    batch_size = _int_opt(opts, "batch_size", 32)
    max_length = _int_opt(opts, "max_length", 128)
    limit = _int_opt(opts, "limit", None)
    tok_dir = opts.pop("tokenizer", None)
    _no_more(opts, "seqcls")
    rows = rows[:limit]

    def run(model: Path) -> float:
        import torch
        from transformers import AutoModelForSequenceClassification

        tok = _tokenizer(model, tok_dir)
        m = AutoModelForSequenceClassification.from_pretrained(model).eval()
        y = torch.tensor(_label_ids([r[1] for r in rows], m.config))
        preds = []
        with torch.inference_mode():
            for i in range(0, len(rows), batch_size):
                enc = tok([r[0] for r in rows[i:i + batch_size]], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
                preds.append(m(**enc).logits.argmax(-1))
        return (torch.cat(preds) == y).double().mean().item()

    return run, f"seqcls:{file_sha256(target)}:{batch_size}:{max_length}:{limit}:{tok_dir}"


def _lm(rest: str):
    target, opts = _options(rest)
    p = Path(target)
    if not p.is_file():
        raise WeightopsError(f"--eval lm: no such file {p}")
    max_length = _int_opt(opts, "max_length", 512)
    limit = _int_opt(opts, "limit", None)
    tok_dir = opts.pop("tokenizer", None)
    _no_more(opts, "lm")

    def run(model: Path) -> float:
        return -perplexity(model, p.read_text(), max_length=max_length, limit=limit, tokenizer=tok_dir)

    return run, f"lm:{file_sha256(p)}:{max_length}:{limit}:{tok_dir}"


def perplexity(model, text: str, *, max_length: int = 512, limit: int | None = None, tokenizer=None) -> float:
    """exp(mean token NLL) over non-overlapping windows of `max_length` tokens (every token but each window's first is predicted)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(Path(model), tokenizer)
    m = AutoModelForCausalLM.from_pretrained(model).eval()
    ids = tok(text, return_tensors="pt").input_ids[0]
    n_pos = getattr(m.config, "max_position_embeddings", None) or max_length
    win = max(2, min(max_length, n_pos))
    windows = [ids[i:i + win] for i in range(0, len(ids), win) if len(ids[i:i + win]) > 1][:limit]
    if not windows:
        raise WeightopsError("--eval lm: the text has fewer than 2 tokens")
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            logits = m(input_ids=w[None]).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
            count += len(w) - 1
    return math.exp(nll / count)


# --- labelled data for methods that train on held-out data (learned soups) --------------
def supervised_data(spec: str):
    """(rows of (text, label), tokenizer dir or None, max_length) behind a zoo: or seqcls: spec."""
    if not isinstance(spec, str) or not spec.startswith(("zoo:", "seqcls:")):
        raise WeightopsError(f"training on held-out data needs a zoo:<task>[:<split>] or seqcls:<file> spec, got {spec!r}")
    kind, _, rest = spec.partition(":")
    if kind == "zoo":
        parts = rest.split(":")
        split = parts[1] if len(parts) > 1 and parts[1] else "validation"
        limit = int(parts[2]) if len(parts) > 2 and parts[2] else None
        from weightops.zoo.runtime import pretrained_dir
        from weightops.zoo.tasks import TASKS, load_task
        from weightops.zoo.train import MAX_LEN

        if parts[0] not in TASKS:
            raise WeightopsError(f"unknown zoo task '{parts[0]}'; tasks are {', '.join(TASKS)}")
        return load_task(parts[0])[split][:limit], str(pretrained_dir()), MAX_LEN
    target, opts = _options(rest)
    rows = read_labelled(target)[:_int_opt(opts, "limit", None)]
    return rows, opts.get("tokenizer"), _int_opt(opts, "max_length", 128)


# --- scratch candidates ---------------------------------------------------------------
def scratch_root() -> Path:
    """Where candidates live while scored: $WEIGHTOPS_SCRATCH, /dev/shm (RAM) when writable, else the temp dir."""
    env = os.environ.get("WEIGHTOPS_SCRATCH")
    if env:
        return Path(env)
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


@contextmanager
def scratch_dir(prefix: str = "weightops-cand-", root=None) -> Iterator[Path]:
    """A temporary directory for candidate models, removed on exit (also on errors)."""
    root = Path(root) if root is not None else scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def evaluate_state(state: dict, template, evaluator, *, root=None) -> float:
    """Score an in-memory state dict: written next to `template`'s config/tokenizer files in a scratch dir, then removed."""
    from safetensors.torch import save_file

    from weightops.io.checkpoint import SIDECAR_FILES

    ev = make_evaluator(evaluator)
    with scratch_dir(root=root) as d:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})
        t = Path(template)
        for n in SIDECAR_FILES:
            if (t / n).is_file():
                shutil.copy2(t / n, d / n)
        return ev(d)


def evaluate_many(evaluator, models: list, *, workers: int = 1) -> list[float]:
    """Scores of independent models, in order; `workers` > 1 scores them in a process pool.

    Cache hits are answered here; only the rest go to the pool. Every worker
    runs the same evaluator, so the scores are the same as with workers=1.
    """
    ev = make_evaluator(evaluator)
    models = [Path(m) for m in models]
    out: list[float | None] = [ev.cached(m) for m in models]
    ev.hits += sum(x is not None for x in out)
    todo = [i for i, x in enumerate(out) if x is None]
    if workers > 1 and len(todo) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        import pickle

        try:
            pickle.dumps(ev.spec)
        except Exception:
            raise WeightopsError("parallel evaluation (workers > 1) needs a spec string or a module-level function") from None
        args = (ev.spec, str(ev.cache_dir), ev.cache, ev.spec_key)
        with cf.ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context("spawn")) as pool:
            for i, s in zip(todo, pool.map(_score_in_worker, [args] * len(todo), [models[i] for i in todo])):
                out[i] = s
        ev.calls += len(todo)
    else:
        for i in todo:
            out[i] = ev(models[i])
    return [float(x) for x in out]


def _score_in_worker(args, model) -> float:
    spec, cache_dir, cache, spec_key = args
    ev = make_evaluator(spec, cache_dir=cache_dir, cache=cache)
    ev.spec_key, ev.cache = spec_key, cache and spec_key is not None
    return ev(model)
