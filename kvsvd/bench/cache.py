"""Cache benchmark: compression time per layer group, bytes held, decode speed vs DynamicCache.

One run measures, side by side on the same context: a dense ``DynamicCache`` and each
LowRankCache configuration, and writes ``results/cache/<model>_<tokens>.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..cache import LowRankCache
from ..config import config_for_ratio
from .kernels import natural_text


@torch.no_grad()
def measure(model, context_ids: torch.Tensor, cache, decode_tokens: int, forced: list[int] | None = None) -> dict:
    """Prefill, compress (timed apart), then decode ``decode_tokens`` tokens one by one.

    Greedy; with ``forced`` (the dense run's tokens) each step is fed the forced token
    instead (teacher forcing: same work, and the top-1 agreement per step is comparable).
    """
    t0 = time.perf_counter()
    out = model(context_ids, past_key_values=cache, logits_to_keep=1)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    if isinstance(cache, LowRankCache):
        cache.compress_pending()
    compress_ms = (time.perf_counter() - t0) * 1e3
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(token)]
    t0 = time.perf_counter()
    for i in range(decode_tokens):
        feed = token if forced is None else torch.tensor([[forced[i]]])
        token = model(feed, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    decode_s = time.perf_counter() - t0
    res = {"prefill_ms": prefill_ms, "compress_ms": compress_ms, "decode_tokens_per_s": decode_tokens / decode_s,
           "decode_ms_per_token": decode_s * 1e3 / decode_tokens, "tokens": tokens}
    if isinstance(cache, LowRankCache):
        res["memory"] = cache.memory_report()
        res["compression_log"] = cache.compression_log
    else:
        n = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        res["memory"] = {"total_bytes": n, "dense_equivalent_bytes": n, "ratio": 1.0}
    return res


def run(context_tokens: int = 2048, decode_tokens: int = 32, ratios=(4.0, 8.0), groups=(1, 2, 4),
        out: str | Path = "results/cache", model_name: str = "smollm2-135m") -> dict:
    from ..models import load_model
    model, tok = load_model(model_name)
    ids = tok(natural_text(context_tokens * 8), return_tensors="pt").input_ids[:, :context_tokens]
    configs = {"dense": None}
    for ratio in ratios:
        for G in groups:
            configs[f"{'svd' if G == 1 else 'xkv'}_G{G}_{ratio:g}x"] = config_for_ratio(
                ratio, context_tokens, model.config, method="svd" if G == 1 else "xkv", layer_group_size=G)
    results = {}
    for name, cfg in tqdm(configs.items(), desc="cache bench"):
        cache = DynamicCache() if cfg is None else LowRankCache(cfg, model.config)
        forced = None if cfg is None else results["dense"]["tokens"]
        results[name] = {"config": None if cfg is None else cfg.to_dict(),
                         **measure(model, ids, cache, decode_tokens, forced)}
    dense_tokens = results["dense"]["tokens"]
    for r in results.values():  # top-1 agreement per step under teacher forcing with the dense tokens
        r["top1_agreement_with_dense"] = sum(a == b for a, b in zip(r["tokens"], dense_tokens)) / len(dense_tokens)
    payload = {"model": model_name, "context_tokens": context_tokens, "decode_tokens": decode_tokens,
               "threads": torch.get_num_threads(), "device": "cpu", "results": results}
    path = Path(out) / f"{model_name}_{context_tokens}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    return payload


def table(payload: dict) -> str:
    lines = [f"{'config':<14}{'rank_k':>7}{'rank_v':>7}{'ratio':>7}{'prefill ms':>11}{'compress ms':>12}{'ms/group':>9}"
             f"{'decode tok/s':>13}{'x dense':>8}{'top1':>6}"]
    dense_tps = payload["results"]["dense"]["decode_tokens_per_s"]
    for name, r in payload["results"].items():
        cfg = r["config"] or {}
        log = r.get("compression_log", [])
        per_group = sum(e["ms"] for e in log) / len(log) if log else 0.0
        lines.append(f"{name:<14}{cfg.get('rank_k', '-'):>7}{cfg.get('rank_v', '-'):>7}{r['memory']['ratio']:>7.2f}"
                     f"{r['prefill_ms']:>11.0f}{r['compress_ms']:>12.1f}{per_group:>9.1f}{r['decode_tokens_per_s']:>13.2f}"
                     f"{r['decode_tokens_per_s'] / dense_tps:>8.2f}{r['top1_agreement_with_dense']:>6.2f}")
    return "\n".join(lines)
