"""Decode speed of every method against dense, by context length and ratio, side by side in one run.

For each context length one prose context. Every method is a grid method dict (``kvsvd.gridspec``: kvsvd's
methods and the peers) built for that context by the grid's own ``build``; its cache is prefilled (a press
prunes in its prefill hooks) and a kvsvd cache compresses. Then every cache decodes the same teacher-forced
tokens (the FP32 dense cache's greedy continuation), one per step, in blocks of ``decode_tokens``, ``rounds``
times in rotated order, and each method's median step is compared with dense's from the same run. A kvsvd
cache decodes twice, from copies of one compressed cache: through ``attn_implementation="kvsvd"`` (attention
from its factors or codes; ``kvsvd attention``) and through SDPA over K/V rebuilt each step (``rebuilt K/V``);
a peer through the model's own attention. Writes ``results/decode/<model>_<tokens>.json``; an existing file
is not remeasured unless ``force``.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import accounting
from ..cache import LowRankCache
from ..calibrate import ensure as ensure_calibration
from ..compat import crop_to, with_cache
from ..evaluate import prefill_context
from ..grid import require_peers
from ..gridspec import entry, label
from . import load_or_measure
from .attention import decode_steps
from .kernels import natural_text

# every family at the ratios the frontier's focused set compares (config_for_ratio's transform defaults: each
# prompt's own basis at 4x, the calibrated one at 8x; and post-RoPE keys, attended from their codes, on each
# prompt's own basis)
METHODS = ({"method": "none"}, {"method": "dense16"},
           {"method": "transform", "ratio": 4}, {"method": "transform", "ratio": 8},
           {"method": "transform", "ratio": 4, "key_space": "post_rope"},
           {"method": "transform", "ratio": 8, "key_space": "post_rope"},
           {"method": "xkv", "layer_group_size": 2, "ratio": 4, "key_space": "pre_rope"},
           {"method": "quantized", "backend": "quanto", "nbits": 4}, {"method": "quantized", "backend": "hqq", "nbits": 4},
           {"method": "turboquant", "nbits": 4},
           {"method": "press", "press": "tova", "ratio": 4}, {"method": "press", "press": "tova", "ratio": 8},
           {"method": "press", "press": "streaming_llm", "ratio": 4},
           {"method": "press", "press": "streaming_llm", "ratio": 8})
PATHS = {"kvsvd": "kvsvd attention", "sdpa": "rebuilt K/V"}  # a kvsvd cache's two decode paths


@torch.no_grad()
def run(context_lengths=(1024, 2048, 4096), decode_tokens: int = 8, rounds: int = 3, methods=METHODS,
        out: str | Path = "results/decode", model_name: str = "smollm2-135m", model=None, tokenizer=None,
        force: bool = False) -> list[dict]:
    """Measure every context length; returns the payloads (one per length, each written as JSON)."""
    if not methods or methods[0] != {"method": "none"}:
        raise ValueError("methods must start with {'method': 'none'}: the dense cache every speed is compared with")
    if not (isinstance(decode_tokens, int) and decode_tokens >= 1 and isinstance(rounds, int) and rounds >= 1):
        raise ValueError(f"decode_tokens={decode_tokens}, rounds={rounds} are out of range; accepted: integers >= 1")
    require_peers(list(methods))  # an unknown method or key, or a peer not installed, is refused before the model loads
    if model is None:
        from ..models import load_model
        model, tokenizer = load_model(model_name)
    limit = model.config.max_position_embeddings - decode_tokens * rounds
    bad = [n for n in context_lengths if not (isinstance(n, int) and 1 <= n <= limit)]
    if bad:
        raise ValueError(f"context_lengths {bad} out of range; accepted: integers in [1, {limit}] ({model_name}: "
                         f"{model.config.max_position_embeddings} positions minus {decode_tokens}×{rounds} decoded)")
    for calibration in {entry(m).calibration for m in methods} - {None}:
        ensure_calibration(model, tokenizer, *calibration)
    return [load_or_measure(Path(out) / f"{model_name}_{n}.json", force,
                            lambda n=n: run_length(model, tokenizer, n, decode_tokens, rounds, methods, model_name))
            for n in tqdm(context_lengths, desc="decode speed (context lengths)")]


def run_length(model, tok, context_tokens: int, decode_tokens: int, rounds: int, methods, model_name: str) -> dict:
    """Every method at one context length: prefill (and compression) once each, then the rotated decode rounds."""
    ids = tok(natural_text(context_tokens * 8), return_tensors="pt").input_ids[:, :context_tokens].to(model.device)
    if ids.shape[1] < context_tokens:
        raise ValueError(f"context_tokens={context_tokens} is out of range for the shipped prose; "
                         f"accepted: <= {ids.shape[1]}")
    previous = model.config._attn_implementation
    runs: dict[str, dict] = {}  # label → cache, attention, method, prefill and compression ms
    try:
        for method in tqdm(methods, desc=f"{context_tokens} tokens: prefill", leave=False):
            made = entry(method)
            cache, press = made.build(model, context_tokens)
            model.set_attn_implementation("eager" if made.eager else previous)
            t0 = time.perf_counter()
            prefill_context(model, ids, cache, press)
            t1 = time.perf_counter()
            if isinstance(cache, LowRankCache):
                cache.compress_pending()
            timed = {"method": method, "prefill_ms": (t1 - t0) * 1e3, "compress_ms": (time.perf_counter() - t1) * 1e3}
            if isinstance(cache, LowRankCache):
                for i, (impl, path) in enumerate(PATHS.items()):  # the last path decodes the cache itself
                    runs[f"{label(method)} · {path}"] = {**timed, "attention": impl,
                                                         "cache": cache if i == len(PATHS) - 1 else copy.deepcopy(cache)}
            else:
                runs[label(method)] = {**timed, "cache": cache, "attention": model.config._attn_implementation}
        dense = runs[label(methods[0])]
        tokens = _greedy(model, copy.deepcopy(dense["cache"]), ids, decode_tokens * rounds, dense["attention"])
        steps: dict[str, list[float]] = {name: [] for name in runs}
        order = list(runs)
        for r in tqdm(range(rounds), desc=f"{context_tokens} tokens: decode rounds", leave=False):
            chunk = tokens[r * decode_tokens:(r + 1) * decode_tokens]
            shift = r * len(order) // rounds
            for name in order[shift:] + order[:shift]:
                model.set_attn_implementation(runs[name]["attention"])
                steps[name] += decode_steps(model, runs[name]["cache"], chunk, context_tokens + r * decode_tokens)
    finally:
        model.set_attn_implementation(previous)
    dense_ms = statistics.median(steps[label(methods[0])])
    results = {}
    for name, run_ in runs.items():
        cache, ms = run_["cache"], statistics.median(steps[name])
        mem = accounting.cache_report(cache, model.config, context_tokens + decode_tokens * rounds)
        results[name] = {"method": run_["method"], "attention": run_["attention"], "ms_per_token_median": ms,
                         "tokens_per_s": 1e3 / ms, "vs_dense": dense_ms / ms, "step_ms": steps[name],
                         "prefill_ms": run_["prefill_ms"], "compress_ms": run_["compress_ms"],
                         "kv_ratio": mem["ratio"], "kv_bytes": mem["total_bytes"],
                         "paths": cache.path_counts() if isinstance(cache, LowRankCache) else None}
    return {"model": model_name, "context_tokens": context_tokens, "decode_tokens": decode_tokens, "rounds": rounds,
            "device": str(model.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "dtype": str(model.dtype), "results": results}


def _greedy(model, cache, ids: torch.Tensor, n: int, attention: str) -> list[int]:
    """The dense ``cache``'s greedy continuation of the context ``ids`` (1, T) it holds: ``n`` tokens, the ones
    every method is fed. The cache (a copy) is cut back by one token to read the last context token's logits."""
    model.set_attn_implementation(attention)
    crop_to(cache, ids.shape[1] - 1)
    tokens, last = [], int(ids[0, -1])
    for i in range(n):
        pos = torch.tensor([[ids.shape[1] - 1 + i]], device=model.device)
        logits = model(input_ids=torch.tensor([[last]], device=model.device), **with_cache(cache), position_ids=pos).logits
        last = int(logits[0, -1].argmax())
        tokens.append(last)
    return tokens


def table(payload: dict) -> str:
    """One context length's speeds, each against dense from the same run."""
    w = max(map(len, payload["results"])) + 2
    lines = [f"{payload['model']} {payload['dtype']} on {payload['device']} ({payload['threads']} threads), context "
             f"{payload['context_tokens']} tokens, median of {payload['decode_tokens']}×{payload['rounds']} steps",
             f"{'method · path':<{w}}{'KV ×fewer':>10}{'ms/token':>10}{'tok/s':>8}{'× dense':>9}{'compress ms':>12}"]
    for name, r in payload["results"].items():
        lines.append(f"{name:<{w}}{r['kv_ratio']:>10.2f}{r['ms_per_token_median']:>10.1f}{r['tokens_per_s']:>8.2f}"
                     f"{r['vs_dense']:>9.2f}{r['compress_ms']:>12.0f}")
    return "\n".join(lines)
