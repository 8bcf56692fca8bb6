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
from ..config import CompressionConfig, config_for_ratio
from ..evaluate import answer


def configs(model_config, tokens: int, ratios=(4.0, 8.0)) -> dict[str, CompressionConfig | None]:
    out: dict[str, CompressionConfig | None] = {"dense": None}
    for ratio in ratios:
        for name, method, G, key_space in (("svd_post", "svd", 1, "post_rope"), ("svd_pre", "svd", 1, "pre_rope"),
                                           ("xkv2_pre", "xkv", 2, "pre_rope"), ("xkv5_pre", "xkv", 5, "pre_rope")):
            out[f"{name}_{ratio:g}x"] = config_for_ratio(ratio, tokens, model_config, method=method,
                                                         layer_group_size=G, key_space=key_space)
    out[f"xkv5_pre_{ratios[-1]:g}x_equal_ranks"] = config_for_ratio(ratios[-1], tokens, model_config, method="xkv",
                                                                    layer_group_size=5, key_space="pre_rope", k_share=0.5)
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
        lines.append(f"{name:<26}{c.get('rank_k') or '-':>7}{c.get('rank_v') or '-':>7}{r['ratio']:>7.2f}{r['score']:>7.1f}")
    return "\n".join(lines)
