"""Hugging Face hub ids as model paths: `org/name[@revision]`, resolved through the HF cache.

Every command opens its models through `weightops.io.checkpoint`, which calls
`resolve()` for a path that does not exist locally but looks like a hub id. The
rules, in order:

1. A local file or directory with that name wins (as transformers does).
2. The HF cache (`HF_HUB_CACHE`, else `HF_HOME`/hub, else ~/.cache/huggingface/hub)
   is looked up without any network access (`local_files_only`): a snapshot of
   the revision (default `main`) that holds the weights is used as it is.
3. With `HF_HUB_OFFLINE=1` nothing is downloaded: a model missing from the cache
   is one error naming the id, the revision and the cache directory.
4. Otherwise the snapshot is downloaded with huggingface_hub, safetensors weights
   and the small JSON/tokenizer files only (never pickled `.bin` weights).

The resolved directory remembers the repo id, the requested revision and the
commit (`HubRef`), and the manifest records them next to the file hashes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from weightops.errors import CheckpointError

# org/name with an optional @revision (branch, tag or commit); no leading '.', '/' or '~'.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<rev>[A-Za-z0-9_./-]+))?$")
# What a model snapshot needs; pickled weights (*.bin, *.pt) are never fetched.
ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer.model", "spiece.model",
                  "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None  # as asked (None: the default branch)
    commit: str | None  # the snapshot's commit hash
    path: Path

    def as_dict(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision or "main", "commit": self.commit}


_RESOLVED: dict[Path, HubRef] = {}


def parse(ref: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `ref` is shaped like a hub id, else None."""
    m = HUB_ID.match(str(ref))
    return (m.group("repo"), m.group("rev")) if m else None


def looks_like_hub_id(ref) -> bool:
    return not Path(str(ref)).exists() and parse(str(ref)) is not None


def cache_dir() -> Path:
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve(ref: str) -> Path:
    """A local directory for `ref`: the path itself when it exists, else the hub snapshot (see module doc)."""
    p = Path(str(ref))
    if p.exists():
        return p
    parsed = parse(str(ref))
    if parsed is None:
        raise CheckpointError(f"{ref}: no such file or directory (nor a hub id org/name[@revision])")
    repo_id, revision = parsed
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = cache_dir()
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True,
                                 allow_patterns=ALLOW_PATTERNS)
        if not _has_weights(Path(path)):  # e.g. only config.json cached by an earlier AutoConfig call
            raise LocalEntryNotFoundError(f"{where}: the cached snapshot has no weights")
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as e:
        if offline():
            raise CheckpointError(f"{where} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE=1 forbids "
                                  f"downloading it (download it once online, or give a local directory)") from None
        del e
        try:
            path = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), allow_patterns=ALLOW_PATTERNS)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e2:
            raise CheckpointError(f"{where}: cannot download from the Hugging Face hub ({e2.__class__.__name__}: "
                                  f"{str(e2).splitlines()[0] if str(e2) else ''})") from None
    path = Path(path)
    commit = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else None
    _RESOLVED[path.resolve()] = HubRef(repo_id, revision, commit, path)
    return path


def _has_weights(p: Path) -> bool:
    return any(p.glob("*.safetensors")) or (p / "adapter_config.json").is_file()


def hub_ref(path) -> HubRef | None:
    """The hub id a resolved directory came from (None for plain local paths)."""
    try:
        return _RESOLVED.get(Path(path).resolve())
    except OSError:
        return None


def describe(path) -> dict:
    """Manifest fields for a model path: {'repo_id', 'revision', 'commit'} for hub snapshots, else {}."""
    h = hub_ref(path)
    return {"hub": h.as_dict()} if h is not None else {}
