"""Can a patch be added to a target version? Names, shapes, dtypes, and how far the base moved.

Patch target names are mapped to the target's names by regex rename rules
(applied in order, `re.sub`), for versions that renamed modules. Every target
must then exist in the target checkpoint with the same shape (a patch is added
element-wise: versions with a different vocabulary or FFN width cannot take it)
and the same dtype (unless `allow_dtype_mix`: the sum is computed in fp32 and
cast to the target's dtype anyway). Only headers are read for this.

With the patch's source base V1 at hand, the drift report streams both
versions' targeted tensors: per matrix ‖ΔW_patch‖_F against ‖θv2 − θv1‖_F (the
PortLLM argument is that the patch survives when it is small and low-rank
relative to an update that is not), and whether V1's tensors match the
fingerprint stored in the patch.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

from weightops.errors import AlignmentError, WeightopsError
from weightops.io.checkpoint import Checkpoint
from weightops.patches.format import HASH_BLOCK, Patch, dtype_name, raw_bytes

RENAME_SEP = "=>"


def parse_renames(rules) -> list[tuple[re.Pattern, str]]:
    """Rename rules from 'PATTERN=>REPLACEMENT' strings, [pattern, replacement] pairs or a {pattern: replacement} dict."""
    if not rules:
        return []
    if isinstance(rules, dict):
        rules = list(rules.items())
    out = []
    for rule in rules:
        if isinstance(rule, str):
            if RENAME_SEP not in rule:
                raise WeightopsError(f"rename rule '{rule}' must look like 'PATTERN{RENAME_SEP}REPLACEMENT'")
            pat, repl = rule.split(RENAME_SEP, 1)
        elif isinstance(rule, (list, tuple)) and len(rule) == 2:
            pat, repl = rule
        else:
            raise WeightopsError(f"rename rule {rule!r} must be 'PATTERN{RENAME_SEP}REPLACEMENT' or a [pattern, replacement] pair")
        try:
            out.append((re.compile(str(pat)), str(repl)))
        except re.error as e:
            raise WeightopsError(f"rename rule '{pat}': bad regex ({e})") from None
    return out


def map_names(names, rules) -> dict[str, str]:
    """patch name -> target name, each rule applied in order."""
    out = {}
    for name in names:
        new = name
        for pat, repl in rules:
            try:
                new = pat.sub(repl, new)
            except (re.error, IndexError) as e:
                raise WeightopsError(f"rename rule '{pat.pattern}' -> '{repl}': {e}") from None
        out[name] = new
    return out


def _names(names: list[str], n: int = 3) -> str:
    shown = ", ".join(f"'{x}'" for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


@dataclass
class CheckReport:
    patch: str
    target: str
    mapping: dict[str, str]  # patch name -> target name
    problems: list[dict] = field(default_factory=list)  # {name, target, problem: missing|shape|dtype|collision, detail}
    notes: list[str] = field(default_factory=list)
    drift: list[dict] | None = None
    source_matches: bool | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def error_message(self) -> str:
        """All problems in one line: one clause per kind, naming the first offenders."""
        parts = []
        by = {k: [p for p in self.problems if p["problem"] == k] for k in ("missing", "collision", "shape", "dtype")}
        if by["missing"]:
            parts.append(f"{len(by['missing'])} patch target(s) are missing: "
                         f"{_names([p['target'] for p in by['missing']])} (map renamed modules with --rename 'PATTERN=>REPLACEMENT')")
        if by["collision"]:
            parts.append(f"rename rules map several targets onto {_names([p['target'] for p in by['collision']])}")
        for kind, hint in (("shape", "versions with different shapes cannot be patched by addition"),
                           ("dtype", "pass --allow-dtype-mix to add in fp32 and cast to the target's dtype")):
            if by[kind]:
                more = f" (+{len(by[kind]) - 1} more)" if len(by[kind]) > 1 else ""
                parts.append(f"{kind} mismatch: {by[kind][0]['detail']}{more}; {hint}")
        return f"patch {self.patch} does not fit {self.target}: " + "; ".join(parts)

    def raise_if_incompatible(self) -> None:
        if self.problems:
            raise AlignmentError(self.error_message())

    def to_json(self) -> dict:
        return {"patch": self.patch, "target": self.target, "ok": self.ok, "problems": self.problems,
                "renamed": {k: v for k, v in self.mapping.items() if k != v}, "notes": self.notes,
                "source_matches": self.source_matches, "drift": self.drift}


def check_patch(patch, to, *, source=None, rename=None, allow_dtype_mix: bool = False, quiet: bool = True) -> CheckReport:
    """Compatibility of `patch` (a Patch or its dir) with checkpoint `to`; with `source` (V1), the drift report."""
    p = patch if isinstance(patch, Patch) else Patch(patch)
    target = to if isinstance(to, Checkpoint) else Checkpoint(to)
    mapping = map_names(p.entries, parse_renames(rename))
    rep = CheckReport(str(p.path), str(target.path), mapping)
    seen: dict[str, str] = {}
    for name, e in p.entries.items():
        t = mapping[name]
        info = target.infos.get(t)
        row = {"name": name, "target": t}
        if t in seen:
            rep.problems.append({**row, "problem": "collision", "detail": f"'{seen[t]}' and '{name}' both map to '{t}'"})
        seen[t] = name
        if info is None:
            rep.problems.append({**row, "problem": "missing", "detail": f"'{t}' is not in {target.path}"})
        elif tuple(info.shape) != tuple(e.shape):
            rep.problems.append({**row, "problem": "shape", "detail": f"'{t}' is {list(info.shape)} in {target.path} "
                                 f"but the patch was made for {list(e.shape)}"})
        elif dtype_name(info.dtype) != e.dtype and not allow_dtype_mix:
            rep.problems.append({**row, "problem": "dtype", "detail": f"'{t}' is {dtype_name(info.dtype)} in {target.path} "
                                 f"but {e.dtype} in the patch's source base"})
    _note_other_changes(rep, p, target, set(mapping.values()))
    if source is not None:
        _drift(rep, p, target, Checkpoint(source), quiet)
    return rep


def _note_other_changes(rep: CheckReport, p: Patch, target: Checkpoint, targeted: set[str]) -> None:
    """Differences between V1 (the fingerprint) and the target outside the patched tensors: fine, but worth a line."""
    v1 = p.fingerprint.get("tensors", {})
    inverse = {v: k for k, v in rep.mapping.items()}
    changed = [n for n, info in target.infos.items() if n not in targeted and n in v1
               and list(info.shape) != v1[n]["shape"]]
    new = [n for n in target.infos if n not in v1 and n not in inverse]
    if changed:
        rep.notes.append(f"{len(changed)} untargeted tensor(s) changed shape since the patch's base: {_names(changed)}")
    if new:
        rep.notes.append(f"{len(new)} tensor(s) of the target are not in the patch's base: {_names(new)}")


def _drift(rep: CheckReport, p: Patch, target: Checkpoint, v1: Checkpoint, quiet: bool) -> None:
    from weightops.engine import _progress

    fp = p.fingerprint.get("tensors", {})
    fits = {x["name"] for x in rep.problems}
    todo = [(n, e) for n, e in p.entries.items() if n not in fits]
    missing_v1 = [n for n, _ in todo if n not in v1.infos or tuple(v1.infos[n].shape) != tuple(p.entries[n].shape)]
    if missing_v1:
        rep.notes.append(f"V1 {v1.path} lacks (or reshaped) {len(missing_v1)} patch target(s): {_names(missing_v1)}; no drift for them")
    todo = [(n, e) for n, e in todo if n not in missing_v1]
    matches = True
    rows = []
    total = sum(v1.infos[n].nbytes + target.infos[rep.mapping[n]].nbytes for n, _ in todo)
    with _progress(total, quiet, "patch check") as bar:
        for name, e in todo:
            t = rep.mapping[name]
            numel = v1.infos[name].numel
            h = hashlib.sha256()
            sq = v1_sq = value_sq = 0.0
            for start in range(0, numel, HASH_BLOCK):
                stop = min(numel, start + HASH_BLOCK)
                a, b = v1.read(name, start, stop), target.read(t, start, stop)
                h.update(raw_bytes(a))
                a64 = a.double()
                sq += float((b.double() - a64).square().sum())
                v1_sq += float(a64.square().sum())
                if e.kind == "value":  # its delta on V1 is what it adds there
                    value_sq += float((p.value(e, start, stop).double() - a64).square().sum())
                bar.update(a.numel() * a.element_size() + b.numel() * b.element_size())
                v1.release(name, start, stop)
                target.release(t, start, stop)
            matches &= fp.get(name, {}).get("sha256") == h.hexdigest()
            pn, dn = (math.sqrt(value_sq) if e.kind == "value" else p.norm(e)), math.sqrt(sq)
            rows.append({"name": name, "target": t, "kind": e.kind, "rank": e.rank, "patch_norm": pn, "drift_norm": dn,
                         "v1_norm": math.sqrt(v1_sq), "drift_over_patch": dn / pn if pn > 0 else math.inf})
    rep.drift = rows
    rep.source_matches = matches
    if not matches:
        rep.notes.append(f"V1 {v1.path} is not the base this patch was made from (its tensors differ from the patch's "
                         "fingerprint); drift is measured against it anyway")
    v1.close()
