"""Latency harness: decode speed vs context length, compression time per layer group by stage.

For each context length one run measures, side by side on the same prose context: a dense
``DynamicCache`` and each LowRankCache configuration (per-layer SVD and xKV groups at ≈4× and
≈8× fewer bytes, an n_iter sweep, and the transform coder at the same ratios), and writes
``results/cache/<model>_<tokens>.json`` with per-token decode latencies, the compression log (ms per group,
rsvd stage breakdown) and memory_report(). A context length whose file exists is skipped, so a run resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..cache import LowRankCache
from ..compat import with_cache
from .. import accounting
from ..config import CompressionConfig, config_for_ratio
from . import load_or_measure
from .kernels import natural_text


@torch.no_grad()
def measure(model, context_ids: torch.Tensor, cache, decode_tokens: int, forced: list[int] | None = None) -> dict:
    """Prefill, compress (timed apart), then decode ``decode_tokens`` tokens one by one.

    Greedy; with ``forced`` (the dense run's tokens) each step is fed the forced token
    instead (teacher forcing: same work, and the top-1 agreement per step is comparable).
    """
    t0 = time.perf_counter()
    out = model(context_ids, **with_cache(cache), logits_to_keep=1)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    if isinstance(cache, LowRankCache):
        cache.compress_pending()
    compress_ms = (time.perf_counter() - t0) * 1e3
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens, step_ms = [int(token)], []
    for i in range(decode_tokens):
        feed = token if forced is None else torch.tensor([[forced[i]]])
        t0 = time.perf_counter()
        token = model(feed, **with_cache(cache)).logits[:, -1].argmax(-1, keepdim=True)
        step_ms.append((time.perf_counter() - t0) * 1e3)
        tokens.append(int(token))
    ordered = sorted(step_ms)
    res = {"prefill_ms": prefill_ms, "compress_ms": compress_ms, "decode_tokens_per_s": 1e3 * decode_tokens / sum(step_ms),
           "decode_ms_per_token": sum(step_ms) / decode_tokens, "decode_ms_median": ordered[len(ordered) // 2],
           "decode_ms_p90": ordered[int(0.9 * (len(ordered) - 1))], "decode_step_ms": step_ms, "tokens": tokens}
    res["memory"] = accounting.cache_report(cache, model.config, cache.get_seq_length())
    if isinstance(cache, LowRankCache):
        res["paths"] = cache.path_counts()
        res["compression_log"] = cache.compression_log
    return res


def configs_for(context_tokens: int, model_config, ratios=(4.0, 8.0), groups=(1, 2, 5),
                n_iters=(0, 1, 4), sweep_group: int = 5, transform_group: int = 5) -> dict[str, CompressionConfig | None]:
    """``dense``, then ``svd_G1_4x`` / ``xkv_G<G>_<ratio>x`` for every ratio × group, then the
    n_iter sweep ``xkv_G<sweep_group>_<ratios[0]>x_q<n>`` (the others run at the default n_iter=2),
    then ``transform_G<transform_group>_<ratio>x`` for every ratio (decoded from its codes, each prompt's own
    basis: a bench needs no calibration)."""
    configs: dict[str, CompressionConfig | None] = {"dense": None}
    for ratio in ratios:
        for G in groups:
            configs[f"{'svd' if G == 1 else 'xkv'}_G{G}_{ratio:g}x"] = config_for_ratio(
                ratio, context_tokens, model_config, method="svd" if G == 1 else "xkv", layer_group_size=G)
    for q in n_iters:
        configs[f"xkv_G{sweep_group}_{ratios[0]:g}x_q{q}"] = config_for_ratio(
            ratios[0], context_tokens, model_config, method="xkv", layer_group_size=sweep_group, n_iter=q)
    for ratio in ratios:
        configs[f"transform_G{transform_group}_{ratio:g}x"] = config_for_ratio(
            ratio, context_tokens, model_config, method="transform", layer_group_size=transform_group, basis="prompt")
    return configs


def run(context_lengths=(1024, 2048, 4096), decode_tokens: int = 32, out: str | Path = "results/cache",
        model_name: str = "smollm2-135m", force: bool = False, model=None, tokenizer=None, **grid) -> list[dict]:
    """Measure every context length (``grid`` goes to :func:`configs_for`); returns the payloads."""
    if model is None:
        from ..models import load_model
        model, tokenizer = load_model(model_name)
    limit = model.config.max_position_embeddings - decode_tokens
    bad = [n for n in context_lengths if not (isinstance(n, int) and 1 <= n <= limit)]
    if bad:
        raise ValueError(f"context_lengths {bad} out of range; accepted: integers in [1, {limit}] "
                         f"({model_name}: {model.config.max_position_embeddings} positions minus {decode_tokens} decoded)")
    return [load_or_measure(Path(out) / f"{model_name}_{n}.json", force,
                            lambda n=n: run_length(model, tokenizer, n, decode_tokens, configs_for(n, model.config, **grid),
                                               model_name))
            for n in tqdm(context_lengths, desc="latency (context lengths)")]


def run_length(model, tok, context_tokens: int, decode_tokens: int, configs: dict, model_name: str) -> dict:
    ids = tok(natural_text(context_tokens * 8), return_tensors="pt").input_ids[:, :context_tokens]
    if ids.shape[1] < context_tokens:
        raise ValueError(f"context_tokens={context_tokens} is out of range for the shipped prose; "
                         f"accepted: <= {ids.shape[1]}")
    results = {}
    for name, cfg in tqdm(configs.items(), desc=f"{context_tokens} tokens", leave=False):
        cache = DynamicCache() if cfg is None else LowRankCache(cfg, model.config)
        forced = None if cfg is None else results["dense"]["tokens"]
        results[name] = {"config": None if cfg is None else cfg.to_dict(),
                         **measure(model, ids, cache, decode_tokens, forced)}
    dense_tokens = results["dense"]["tokens"]
    for r in results.values():  # top-1 agreement per step under teacher forcing with the dense tokens
        r["top1_agreement_with_dense"] = sum(a == b for a, b in zip(r["tokens"], dense_tokens)) / len(dense_tokens)
    return {"model": model_name, "context_tokens": context_tokens, "decode_tokens": decode_tokens,
            "threads": torch.get_num_threads(), "device": str(model.device), "torch": torch.__version__,
            "results": results}


def table(payload: dict) -> str:
    lines = [f"context {payload['context_tokens']} tokens, {payload['decode_tokens']} decode tokens, {payload['device']}",
             f"{'config':<16}{'rank_k':>7}{'rank_v':>7}{'ratio':>7}{'prefill ms':>11}{'compress ms':>12}{'ms/group':>9}"
             f"{'decode tok/s':>13}{'x dense':>8}{'top1':>6}"]
    dense_tps = payload["results"]["dense"]["decode_tokens_per_s"]
    for name, r in payload["results"].items():
        cfg = r["config"] or {}
        log = r.get("compression_log", [])
        per_group = sum(e["ms"] for e in log) / len(log) if log else 0.0
        lines.append(f"{name:<16}{cfg.get('rank_k') or '-':>7}{cfg.get('rank_v') or '-':>7}{r['memory']['ratio']:>7.2f}"
                     f"{r['prefill_ms']:>11.0f}{r['compress_ms']:>12.1f}{per_group:>9.1f}{r['decode_tokens_per_s']:>13.2f}"
                     f"{r['decode_tokens_per_s'] / dense_tps:>8.2f}{r['top1_agreement_with_dense']:>6.2f}")
    return "\n".join(lines)
