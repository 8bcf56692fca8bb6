"""Needle retrieval under compression: which levers (pre-RoPE keys, cross-layer groups, a
value-heavy rank split) keep SmolLM2 answering at ≈4× and ≈8× fewer KV bytes.

One JSON per configuration under ``out`` (skipped when present, so a rerun resumes), each with
the score (RULER string_match_all, 0–100), the mean measured byte ratio and every prediction.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm
from transformers import DynamicCache

from .. import ruler
from ..cache import LowRankCache
from ..config import CompressionConfig, ranks_for_ratio
from ..evaluate import answer


def configs(model_config, tokens: int, ratios=(4.0, 8.0)) -> dict[str, CompressionConfig | None]:
    L = model_config.num_hidden_layers
    F = model_config.num_key_value_heads * model_config.head_dim
    out: dict[str, CompressionConfig | None] = {"dense": None}

    def make(method, G, ratio, key_space, k_share=1 / 3):
        rk, rv = ranks_for_ratio(ratio, tokens, G, F, num_layers=L, start_layer=L % G, residual_length=32,
                                 rope_dim=model_config.head_dim if key_space == "pre_rope" else 0, k_share=k_share)
        return CompressionConfig(method=method, layer_group_size=G, rank_k=rk, rank_v=rv, start_layer=L % G,
                                 key_space=key_space, residual_length=32)

    for ratio in ratios:
        out[f"svd_post_{ratio:g}x"] = make("svd", 1, ratio, "post_rope")
        out[f"svd_pre_{ratio:g}x"] = make("svd", 1, ratio, "pre_rope")
        out[f"xkv2_pre_{ratio:g}x"] = make("xkv", 2, ratio, "pre_rope")
        out[f"xkv5_pre_{ratio:g}x"] = make("xkv", 5, ratio, "pre_rope")
    out[f"xkv5_pre_{ratios[-1]:g}x_equal_ranks"] = make("xkv", 5, ratios[-1], "pre_rope", k_share=0.5)
    return out


def run(task: str = "niah_single_2", n_samples: int = 20, context_length: int = 2048,
        out: str | Path = "results/niah", model_name: str = "smollm2-135m") -> dict[str, dict]:
    from ..models import load_model
    model, tok = load_model(model_name)
    samples = ruler.generate(task, n_samples, context_length, tok, seed=0)
    refs = [s["outputs"] for s in samples]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, cfg in tqdm(configs(model.config, context_length).items(), desc=f"{task} @ {context_length}"):
        path = out / f"{model_name}_{task}_{context_length}_{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
            continue
        preds, ratios = [], []
        for s in samples:
            cache = DynamicCache() if cfg is None else LowRankCache(cfg, model.config)
            preds.append(answer(model, tok, s, cache, max_new_tokens=20)["prediction"])
            ratios.append(1.0 if cfg is None else cache.memory_report()["ratio"])
        results[name] = {"task": task, "context_length": context_length, "n_samples": n_samples,
                         "config": None if cfg is None else cfg.to_dict(), "score": ruler.score(task, preds, refs),
                         "ratio": sum(ratios) / len(ratios), "predictions": preds, "references": refs}
        path.write_text(json.dumps(results[name], indent=1))
    return results


def table(results: dict[str, dict]) -> str:
    lines = [f"{'config':<26}{'rank_k':>7}{'rank_v':>7}{'ratio':>7}{'score':>7}"]
    for name, r in results.items():
        c = r["config"] or {}
        lines.append(f"{name:<26}{c.get('rank_k', '-'):>7}{c.get('rank_v', '-'):>7}{r['ratio']:>7.2f}{r['score']:>7.1f}")
    return "\n".join(lines)
