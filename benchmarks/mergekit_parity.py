"""weightops vs mergekit 0.1.5 itself on the same YAML configs: every method and feature.

    python benchmarks/mergekit_parity.py [--only ties,sce] [--out benchmarks/results/mergekit_parity.json]

mergekit 0.1.5 is a test dependency (pyproject `dev` extra; it moves none of torch,
transformers, peft, safetensors, numpy, pydantic or click), so both run in this process.
Models: generated Llama-shaped bf16 checkpoints (tests/mkcases.py: hidden 40, 6 layers, GQA,
SwiGLU, untied head; three fine-tunes with deltas 3e-4, 1e-4, 1e-3 rounded to bf16). Every config
computes in fp32 (`dtype: float32`). For each case: mergekit's `run_merge` and weightops'
`mergekit_merge` write an output; the tensors are compared (max |Δ| / max |x| of the worst tensor,
and how many elements differ), and each case's expectation (mkcases.py: exact, fp32, count,
random) says which differences are by a documented rule. Seconds are wall time on the shared
2-core machine (under load: other agents run there), mergekit's including its planning.

Tokenizer cases (mkcases.token_cases: tokenizer_source union / base / a model, `tokens:` with force,
zero and model_token sources, pad_to_multiple_of, chat_template; Llama-shaped models whose tokenizers
differ in added tokens, one set with tied embeddings) are compared token by token: mergekit numbers a
union's new tokens in Python set order, so its vocabulary rows are first reordered into weightops' ids;
the two tokenizers must hold the same tokens, the same added tokens and render the same chat template.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# this directory's kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import mkcases  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "mergekit_parity.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="comma-separated case names")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    import importlib.metadata as md

    import yaml

    from weightops.mergekit_compat import mergekit_merge

    root = Path(tempfile.mkdtemp(prefix="mk-parity-"))
    models = mkcases.make_models(root / "models")
    rows = {}
    todo = {k: (cfg, expect, False) for k, (cfg, expect) in mkcases.cases(models).items()}
    tok_models = mkcases.make_token_models(root / "tok-models")
    todo.update({k: (cfg, expect, True) for k, (cfg, expect) in mkcases.token_cases(tok_models).items()})
    tied = mkcases.make_token_models(root / "tok-tied", tied=True)
    todo.update({k + "_tied": (cfg, expect, True) for k, (cfg, expect) in mkcases.token_cases(tied).items()
                 if k == "union_task_arithmetic"})
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
    for name, (cfg, expect, by_token) in todo.items():
        (root / f"{name}.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        t = time.perf_counter()
        try:
            mkcases.run_mergekit(cfg, root / f"{name}-mk")
        except Exception as e:  # noqa: BLE001  (report mergekit's own failures)
            rows[name] = {"expect": expect, "mergekit_error": f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            print(f"{name:<26} mergekit failed: {rows[name]['mergekit_error']}", flush=True)
            continue
        t_mk = time.perf_counter() - t
        t = time.perf_counter()
        try:
            res = mergekit_merge(root / f"{name}.yml", root / f"{name}-wo", quiet=True)
        except Exception as e:  # noqa: BLE001
            rows[name] = {"expect": expect, "weightops_error": f"{e.__class__.__name__}: {e}"}
            print(f"{name:<26} weightops failed: {rows[name]['weightops_error']}", flush=True)
            continue
        t_wo = time.perf_counter() - t
        mk, info = mkcases.load(root / f"{name}-mk"), {}
        if by_token:
            mk, info = mkcases.align_by_token(root / f"{name}-mk", root / f"{name}-wo", mk)
        r = mkcases.compare(mk, mkcases.load(root / f"{name}-wo"))
        r.update(info)
        r.update(expect=expect, ok=mkcases.ok(expect, r), seconds_mergekit=round(t_mk, 2),
                 seconds_weightops=round(t_wo, 2), notes=res.manifest["mergekit"]["notes"])
        rows[name] = r
        print(f"{name:<26} {expect:<6} {'ok ' if r['ok'] else 'BAD'} max rel diff {r.get('max_rel_diff', float('nan')):.3g}  "
              f"differing {r.get('elements_differing')}/{r.get('elements')}  (worst {r.get('worst_tensor')})", flush=True)
    doc = {"command": "python benchmarks/mergekit_parity.py", "mergekit_version": md.version("mergekit"),
           "models": "tests/mkcases.py: Llama-shaped, hidden 40, 6 layers, bf16 inputs, fp32 compute; tokenizer cases: "
                     "make_token_models (3 layers, 96/98-token BPE tokenizers differing in added tokens)",
           "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
