"""mergekit configs on generated Llama-shaped checkpoints, run by mergekit 0.1.5 itself and by weightops.

Shared by tests/soup/test_mergekit_parity.py (a CI-sized subset) and benchmarks/mergekit_parity.py
(every case). A module of its own, as checkpoints.py. Every config computes in fp32 (`dtype: float32`,
as the acceptance asks) and the outputs are compared tensor by tensor.

Each case names what may differ and why:
- "exact": bit-identical tensors;
- "fp32": equal to fp32 rounding (weightops accumulates statistics in fp64 or in another order):
  max |Δ| ≤ 1e-5·max|x| per tensor;
- "iterative": mergekit iterates on fp32 vectors, weightops on fp64 Gram matrices: near-identical
  inputs (bf16 layer norms) leave mergekit's fp32 iteration up to ~1e-3 away (its own algorithm run in
  float64 equals ours; tests/soup/test_mergekit_parity.py checks that);
- "random": mergekit draws random masks from torch's global generator, weightops from its
  counter-based stream (a documented rule): only shapes, names and the untouched tensors compare;
- "count": top-k selections where the counting rule differs (round vs int, ties): all but a
  counted number of elements equal.
"""
from __future__ import annotations

from pathlib import Path

import torch

from checkpoints import TINY_LLAMA, make_llama_state, write_model, write_tokenizer

LLAMA6 = dict(TINY_LLAMA, num_hidden_layers=6)
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def make_models(root: Path) -> dict[str, str]:
    """bf16 base + three fine-tunes (deltas ~3e-4, 1e-4, 1e-3: few distinct |δ|, many ties), 6 layers; ft1 sharded."""
    base = make_llama_state(0, cfg=LLAMA6)
    out = {"base": str(write_model(root / "base", base, config=LLAMA6))}
    for i, d in enumerate((3e-4, 1e-4, 1e-3)):
        sd = make_llama_state(100 + i, base=base, delta=d)
        out[f"ft{i}"] = str(write_model(root / f"ft{i}", sd, shards=2 if i == 1 else 1, config=LLAMA6))
    return out


def cases(m: dict[str, str]) -> dict[str, tuple[dict, str]]:
    """name -> (mergekit config, expectation)."""
    b, a, c, d = m["base"], m["ft0"], m["ft1"], m["ft2"]

    def two(**p):
        return [{"model": a, "parameters": dict(p, weight=0.6)}, {"model": c, "parameters": dict(p, weight=0.4)}]

    def three(**p):
        return two(**p) + [{"model": d, "parameters": dict(p, weight=0.3)}]

    out = {
        "linear": ({"models": three(), "merge_method": "linear"}, "fp32"),
        "task_arithmetic": ({"models": three(), "merge_method": "task_arithmetic", "base_model": b,
                             "parameters": {"lambda": 0.8}}, "exact"),
        "ties": ({"models": three(density=0.5), "merge_method": "ties", "base_model": b}, "count"),
        "breadcrumbs": ({"models": two(density=0.8, gamma=0.05), "merge_method": "breadcrumbs", "base_model": b}, "count"),
        "breadcrumbs_ties": ({"models": two(density=0.8, gamma=0.05), "merge_method": "breadcrumbs_ties",
                              "base_model": b}, "count"),
        "dare_ties": ({"models": two(density=0.7), "merge_method": "dare_ties", "base_model": b}, "random"),
        "dare_linear": ({"models": two(density=0.7), "merge_method": "dare_linear", "base_model": b}, "random"),
        "della": ({"models": two(density=0.6, epsilon=0.1), "merge_method": "della", "base_model": b,
                   "parameters": {"lambda": 1.0}}, "random"),
        "della_linear": ({"models": two(density=0.6, epsilon=0.1), "merge_method": "della_linear",
                          "base_model": b}, "random"),
        "sce": ({"models": [{"model": a}, {"model": c}, {"model": d}], "merge_method": "sce", "base_model": b,
                 "parameters": {"select_topk": 0.3}}, "count"),
        "sce_all": ({"models": [{"model": a}, {"model": c}], "merge_method": "sce", "base_model": b}, "fp32"),
        "slerp": ({"models": [{"model": b}, {"model": a}], "merge_method": "slerp", "base_model": b,
                   "parameters": {"t": [0, 0.3, 1]}}, "fp32"),
        "nuslerp": ({"models": [{"model": a, "parameters": {"weight": 0.3}}, {"model": c, "parameters": {"weight": 0.7}}],
                     "merge_method": "nuslerp"}, "fp32"),
        "nuslerp_rows_base": ({"models": [{"model": a, "parameters": {"weight": 0.3}},
                                          {"model": c, "parameters": {"weight": 0.7}}],
                               "merge_method": "nuslerp", "base_model": b,
                               "parameters": {"nuslerp_flatten": False}}, "fp32"),
        "nuslerp_columns": ({"models": [{"model": a, "parameters": {"weight": 1.0}},
                                        {"model": c, "parameters": {"weight": 1.0}}],
                             "merge_method": "nuslerp",
                             "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}, "fp32"),
        "multislerp": ({"models": two(), "merge_method": "multislerp", "base_model": b}, "fp32"),
        "multislerp_nobase": ({"models": three(), "merge_method": "multislerp"}, "fp32"),
        "karcher": ({"models": [{"model": a}, {"model": c}, {"model": d}], "merge_method": "karcher",
                     "parameters": {"max_iter": 20}}, "iterative"),
        "model_stock": ({"models": [{"model": a}, {"model": c}, {"model": d}], "merge_method": "model_stock",
                         "base_model": b}, "fp32"),
        "model_stock_filter_wise": ({"models": [{"model": a}, {"model": c}, {"model": d}],
                                     "merge_method": "model_stock", "base_model": b,
                                     "parameters": {"filter_wise": True}}, "fp32"),
        "nearswap": ({"models": [{"model": a}], "merge_method": "nearswap", "base_model": b,
                      "parameters": {"t": 0.0002}}, "exact"),
        "arcee_fusion": ({"models": [{"model": d}], "merge_method": "arcee_fusion", "base_model": b}, "count"),
        "ram": ({"models": [{"model": a}, {"model": c}, {"model": d}], "merge_method": "ram", "base_model": b, "parameters": {"epsilon": 2e-4}}, "exact"),
        "ramplus_tl": ({"models": [{"model": a}, {"model": c}, {"model": d}], "merge_method": "ramplus_tl", "base_model": b,
                        "parameters": {"epsilon": 2e-4, "r": 0.5, "alpha": 0.5}}, "fp32"),
        "passthrough_frankenmerge": ({"slices": [{"sources": [{"model": a, "layer_range": [0, 4]}]},
                                                 {"sources": [{"model": c, "layer_range": [2, 6]}]}],
                                     "merge_method": "passthrough"}, "exact"),
        "passthrough_dus_scale": ({"slices": [{"sources": [{"model": a, "layer_range": [0, 4]}]},
                                              {"sources": [{"model": a, "layer_range": [2, 6],
                                                            "parameters": {"scale": [{"filter": "o_proj", "value": 0.5},
                                                                                     {"value": 1.0}]}}]}],
                                  "merge_method": "passthrough"}, "exact"),
        "partial_single_slice": ({"slices": [{"sources": [{"model": b, "layer_range": [1, 4]},
                                                          {"model": a, "layer_range": [1, 4]}]}],
                                  "merge_method": "task_arithmetic", "base_model": b,
                                  "parameters": {"weight": 1.0}}, "exact"),
        "slices_per_slice_params": ({"slices": [
            {"sources": [{"model": b, "layer_range": [0, 3]}, {"model": a, "layer_range": [0, 3]}],
             "parameters": {"t": 0.2}},
            {"sources": [{"model": b, "layer_range": [3, 6]}, {"model": c, "layer_range": [3, 6]}],
             "parameters": {"t": [0.1, 0.9]}}],
            "merge_method": "slerp", "base_model": b}, "fp32"),
    }
    for cfg, _ in out.values():
        cfg["dtype"] = "float32"
        cfg["out_dtype"] = "float32"
    return out


def _grow(sd: dict, n: int, seed: int) -> dict:
    """`sd` with n more vocabulary rows (new tokens' embeddings, ~N(0, 0.02) in bf16)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for k in VOCAB_TENSORS:
        if k in sd:
            out[k] = torch.cat([sd[k], (0.02 * torch.randn(n, sd[k].shape[1], generator=g)).to(sd[k].dtype)])
    return out


def make_token_models(root: Path, tied: bool = False) -> dict[str, str]:
    """A base and two fine-tunes whose tokenizers differ in added tokens (tests/checkpoints.py write_tokenizer):
    base: 96 tokens; a: + <|a1|> (96), <|shared|> (97); b: + <|shared|> (96), special <|b1|> (97). So
    <|shared|> is in a and b at different ids, <|a1|> only in a, <|b1|> only in b. `tied`: no lm_head."""
    cfg = dict(TINY_LLAMA, tie_word_embeddings=tied)
    base = make_llama_state(0, cfg=cfg)
    out = {"base": write_model(root / "base", base, config=cfg)}
    write_tokenizer(out["base"])
    for name, seed, added, special in (("a", 101, ["<|a1|>", "<|shared|>"], []), ("b", 102, ["<|shared|>"], ["<|b1|>"])):
        sd = _grow(make_llama_state(seed, base=base, delta=3e-4, cfg=cfg), 2, seed + 10)
        out[name] = write_model(root / name, sd, config=dict(cfg, vocab_size=98))
        write_tokenizer(out[name], added=added, special=special)
    return {k: str(v) for k, v in out.items()}


def token_cases(m: dict[str, str]) -> dict[str, tuple[dict, str]]:
    """Tokenizer configs on make_token_models' models: name -> (config, expectation); compared by token."""
    b, a, c = m["base"], m["a"], m["b"]
    out = {
        "union_task_arithmetic": ({"models": [{"model": a, "parameters": {"weight": 0.6}},
                                              {"model": c, "parameters": {"weight": 0.4}}],
                                   "merge_method": "task_arithmetic", "base_model": b, "tokenizer_source": "union"},
                                  "exact"),
        "union_tokens_pad_linear": ({"models": [{"model": a, "parameters": {"weight": 0.5}},
                                                {"model": c, "parameters": {"weight": 0.5}}],
                                     "merge_method": "linear",
                                     "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
                                         "<s>": {"source": c, "force": True},
                                         "<|new|>": {"source": {"kind": "zero"}},
                                         "<|alias|>": {"source": {"kind": "model_token", "model": a, "token": "th"}}}}},
                                    "fp32"),
        "source_model_ties": ({"models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}},
                                          {"model": c, "parameters": {"weight": 1.0, "density": 0.5}}],
                               "merge_method": "ties", "base_model": b, "tokenizer_source": c}, "count"),
        "source_base_slerp": ({"models": [{"model": b}, {"model": a}], "merge_method": "slerp", "base_model": b,
                               "parameters": {"t": 0.3}, "tokenizer_source": "base"}, "fp32"),
        "union_chatml": ({"models": [{"model": a, "parameters": {"weight": 1.0}}], "merge_method": "task_arithmetic",
                          "base_model": b, "tokenizer_source": "union", "chat_template": "chatml"}, "exact"),
    }
    for cfg, _ in out.values():
        cfg["dtype"] = "float32"
        cfg["out_dtype"] = "float32"
    return out


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello! "}, {"role": "user", "content": "Bye"}]


def align_by_token(mk_dir: Path, wo_dir: Path, mk: dict) -> tuple[dict, dict]:
    """mergekit's vocabulary rows reordered into weightops' token ids (mergekit orders a union's new tokens
    by Python set and dict order), and whether the two tokenizers agree: the same tokens, the same added
    tokens (special or not), the same chat template rendering."""
    from transformers import AutoTokenizer

    tm, tw = AutoTokenizer.from_pretrained(str(mk_dir)), AutoTokenizer.from_pretrained(str(wo_dir))
    vm, vw = tm.get_vocab(), tw.get_vocab()
    added = lambda t: {a.content: a.special for a in t.added_tokens_decoder.values()}  # noqa: E731
    render = lambda t: t.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) if t.chat_template else None  # noqa: E731
    info = {"same_vocab": set(vm) == set(vw), "same_added_tokens": added(tm) == added(tw),
            "same_chat_template": render(tm) == render(tw), "vocab_size": len(vw)}
    if not info["same_vocab"]:
        return mk, info
    order = torch.tensor([vm[t] for t in sorted(vw, key=vw.get)])
    out = dict(mk)
    for k in VOCAB_TENSORS:
        if k in mk:
            out[k] = torch.cat([mk[k][order], mk[k][len(order):]])
    return out, info


def run_mergekit(cfg: dict, out: Path, seed: int = 0) -> None:
    """mergekit-yaml in this process (mergekit 0.1.5 is a test dependency)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, quiet=True, random_seed=seed))


def load(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare(mk: dict, wo: dict) -> dict:
    """Per-run summary: names equal?, worst relative |Δ| (max |Δ| / max |x| of the tensor), elements differing."""
    worst, worst_name, differ, total = 0.0, None, 0, 0
    for k in sorted(set(mk) & set(wo)):
        x, y = mk[k].double(), wo[k].double()
        if x.shape != y.shape:
            return {"same_names": set(mk) == set(wo), "shape_mismatch": k}
        scale = max(x.abs().max().item(), 1e-30) if x.numel() else 1.0
        rel = (x - y).abs().max().item() / scale if x.numel() else 0.0
        if rel > worst:
            worst, worst_name = rel, k
        differ += int((mk[k] != wo[k]).sum())
        total += x.numel()
    return {"same_names": set(mk) == set(wo), "only_mergekit": sorted(set(mk) - set(wo)),
            "only_weightops": sorted(set(wo) - set(mk)), "max_rel_diff": worst, "worst_tensor": worst_name,
            "elements_differing": differ, "elements": total}


def ok(expect: str, r: dict) -> bool:
    if not r.get("same_names") or "shape_mismatch" in r:
        return False
    if not all(r.get(k, True) for k in ("same_vocab", "same_added_tokens", "same_chat_template")):
        return False
    if expect == "exact":
        return r["elements_differing"] == 0
    if expect == "fp32":
        return r["max_rel_diff"] <= 1e-5
    if expect == "iterative":  # mergekit iterates in fp32 where weightops iterates in fp64 (karcher)
        return r["max_rel_diff"] <= 1e-2
    return True  # random / count: reported, not asserted here
