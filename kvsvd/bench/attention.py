"""Decode speed of the three attention paths, side by side in one run, on one long context.

- ``dense``: ``DynamicCache`` with SDPA;
- ``reconstruct``: a LowRankCache read through SDPA (K/V rebuilt from the factors each step);
- ``factors``: the same compressed cache with ``attn_implementation="kvsvd"`` (kvsvd.attention): low-rank
  factors, or the transform coder's coefficients and basis rows (values always, keys when post-RoPE).

``model_name`` is ``smollm2-135m`` (its prose as context) or a ``models.RANDOM_SHAPES`` name such as
``llama-3.1-8b-shaped`` (random weights and random context tokens: the step time does not
depend on the values), built on ``device`` in ``dtype``.

The compressed cache is built once (prefill + compression) and deep-copied for the two low-rank
paths. Every path decodes the same teacher-forced tokens (the dense path's greedy output), so
they do identical work; paths run in blocks, ``rounds`` times in rotated order, and the
medians of all steps are compared. Writes ``results/attention/<model>_<tokens>_<key_space>.json``
(``..._transform.json`` for the transform coder; an existing file is not remeasured unless ``force``).
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..cache import LowRankCache
from ..compat import crop_to, with_cache
from .. import accounting
from ..config import config_for_ratio
from . import load_or_measure
from .kernels import natural_text


def decode_steps(model, cache, tokens: list[int], start: int) -> list[float]:
    """Feed ``tokens`` one by one at positions start..; returns the ms of each step."""
    times = []
    for i, t in enumerate(tokens):
        ids = torch.tensor([[t]], device=model.device)
        pos = torch.tensor([[start + i]], device=model.device)
        t0 = time.perf_counter()
        model(input_ids=ids, **with_cache(cache), position_ids=pos)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


@torch.no_grad()
def run(context_tokens: int = 8192, decode_tokens: int = 16, ratio: float = 4.0, layer_group_size: int = 2,
        key_space: str = "post_rope", rounds: int = 2, out: str | Path = "results/attention",
        model_name: str = "smollm2-135m", model=None, tokenizer=None, force: bool = False,
        device: str = "cpu", dtype: torch.dtype = torch.float32, method: str = "lowrank") -> dict:
    """One measurement (returned, and written as JSON); an existing file is returned unless ``force``.
    ``method``: ``lowrank`` (per-layer SVD for ``layer_group_size`` 1, else xKV, factors in the model's
    dtype) or ``transform`` (``config_for_ratio``'s transform defaults on each prompt's own basis,
    ``layer_group_size`` ignored)."""
    if method not in ("lowrank", "transform"):
        raise ValueError(f"method={method!r} is unknown; accepted: lowrank, transform")
    tag = "" if method == "lowrank" else f"_{method}"
    path = Path(out) / f"{model_name}_{context_tokens}_{key_space}_{ratio:g}x{tag}.json"
    return load_or_measure(path, force, lambda: _measure(context_tokens, decode_tokens, ratio, layer_group_size,
                                                         key_space, rounds, model_name, model, tokenizer, device,
                                                         dtype, method))


def _measure(context_tokens: int, decode_tokens: int, ratio: float, layer_group_size: int, key_space: str,
             rounds: int, model_name: str, model, tokenizer, device: str, dtype: torch.dtype, method: str) -> dict:
    """:func:`run`'s measurement (its arguments, its payload)."""
    if model is None:
        from ..models import RANDOM_SHAPES, load_model, random_model
        if model_name in RANDOM_SHAPES:
            model = random_model(model_name, dtype=dtype, device=device)
        else:
            model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    limit = model.config.max_position_embeddings
    if not 1 <= context_tokens + decode_tokens * rounds <= limit:
        raise ValueError(f"context_tokens={context_tokens} (+ {decode_tokens}×{rounds} decoded) is out of range; "
                         f"accepted: [1, {limit}] for {model_name}")
    if tokenizer is None:  # random weights: random tokens
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(model.config.vocab_size, (1, context_tokens), generator=gen).to(model.device)
    else:
        ids = tokenizer(natural_text(context_tokens * 8), return_tensors="pt").input_ids[:, :context_tokens]
        ids = ids.to(model.device)
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    dense = DynamicCache()
    logits = model(ids, **with_cache(dense), logits_to_keep=1).logits
    tokens = [int(logits[0, -1].argmax())]
    for _ in range(decode_tokens * rounds - 1):  # the dense greedy continuation, forced on every path
        pos = torch.tensor([[context_tokens + len(tokens) - 1]], device=model.device)
        nxt = model(input_ids=torch.tensor([[tokens[-1]]], device=model.device), **with_cache(dense),
                    position_ids=pos).logits
        tokens.append(int(nxt[0, -1].argmax()))
    crop_to(dense, context_tokens)  # back to the bare context
    if method == "transform":
        cfg = config_for_ratio(ratio, context_tokens, model.config, method="transform", key_space=key_space,
                               basis="prompt")
    else:
        factor_dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[model.dtype]
        cfg = config_for_ratio(ratio, context_tokens, model.config, method="svd" if layer_group_size == 1 else "xkv",
                               layer_group_size=layer_group_size, key_space=key_space,
                               factor_dtype=factor_dtype)  # factors at the model's dtype
    low = LowRankCache(cfg, model.config)
    model(ids, **with_cache(low), logits_to_keep=1)
    low.compress_pending()
    caches = {"dense": (dense, "sdpa"), "reconstruct": (copy.deepcopy(low), "sdpa"), "factors": (low, "kvsvd")}
    steps: dict[str, list[float]] = {name: [] for name in caches}
    order = list(caches)
    try:
        for r in tqdm(range(rounds), desc=f"attention paths @ {context_tokens}"):
            chunk = tokens[r * decode_tokens:(r + 1) * decode_tokens]
            for name in order[r % 3:] + order[:r % 3]:
                cache, impl = caches[name]
                model.set_attn_implementation(impl)
                steps[name] += decode_steps(model, cache, chunk, context_tokens + r * decode_tokens)
    finally:
        model.set_attn_implementation(previous)
    res = {}
    for name, ms in steps.items():
        cache = caches[name][0]
        mem = accounting.cache_report(cache, model.config, cache.get_seq_length())
        res[name] = {"ms_per_token_median": statistics.median(ms), "tokens_per_s": 1e3 / statistics.median(ms),
                     "step_ms": ms, "kv_ratio": mem["ratio"], "kv_bytes": mem["total_bytes"],
                     "paths": cache.path_counts() if isinstance(cache, LowRankCache) else None}
    payload = {"model": model_name, "context_tokens": context_tokens, "decode_tokens": decode_tokens, "rounds": rounds,
               "config": cfg.to_dict(), "device": str(model.device), "threads": torch.get_num_threads(),
               "device_name": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else None,
               "random_weights": tokenizer is None,
               "torch": torch.__version__, "dtype": str(model.dtype), "results": res,
               "factors_vs_dense": res["factors"]["tokens_per_s"] / res["dense"]["tokens_per_s"],
               "factors_vs_reconstruct": res["factors"]["tokens_per_s"] / res["reconstruct"]["tokens_per_s"]}
    return payload


def table(p: dict) -> str:
    c = p["config"]
    lines = [f"{p['model']} {p['dtype']} on {p['device']} ({p['threads']} threads), context {p['context_tokens']}, "
             f"{c['method']} G={c['layer_group_size']}"
             + (f" rank_k={c['rank_k']} rank_v={c['rank_v']}" if c.get("rank_k") else "") + f" {c['key_space']}",
             f"{'path':<12}{'ms/token':>10}{'tok/s':>8}{'KV ×fewer':>11}"]
    for name, r in p["results"].items():
        lines.append(f"{name:<12}{r['ms_per_token_median']:>10.1f}{r['tokens_per_s']:>8.2f}{r['kv_ratio']:>11.2f}")
    lines.append(f"factors vs dense: {p['factors_vs_dense']:.2f}×   factors vs reconstruct: "
                 f"{p['factors_vs_reconstruct']:.2f}×")
    return "\n".join(lines)
