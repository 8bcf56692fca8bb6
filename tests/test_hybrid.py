"""LowRankCache on a hybrid-attention model (a tiny random Gemma 3): sliding layers dense and capped at
their window as transformers keeps them, full-attention layers compressed, every byte counted."""

import pytest
import torch
from transformers import DynamicCache

from kvsvd import CompressionConfig, LowRankCache
from kvsvd.accounting import ModelShape
from kvsvd.compat import with_cache
from kvsvd.config import config_for_ratio
from kvsvd.dense import StoredSlidingLayer
from conftest import held_storage_bytes

pytestmark = pytest.mark.core  # also run in the current environment


def greedy(model, ids, cache, n=12):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones_like(ids), **with_cache(cache))


@pytest.mark.parametrize("method, G", [("svd", 1), ("xkv", 2)])
def test_full_rank_on_the_full_attention_layers_gives_the_dense_cache_tokens(tiny_gemma3, method, G):
    """Per-layer SVD and xKV at full rank (FP32 factors) over the two full-attention layers (2 and 5: a group
    of xKV spans the sliding layers between them) reproduce DynamicCache's greedy tokens; the sliding layers
    hold their window only, as transformers' do."""
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    ref = greedy(tiny_gemma3, ids, DynamicCache(config=tiny_gemma3.config))
    cfg = CompressionConfig.of(method=method, layer_group_size=G, rank_k=32 * G, rank_v=32 * G, factor_dtype="fp32",
                            dense_dtype="fp32", residual_length=3, block_size=8)
    cache = LowRankCache(cfg, tiny_gemma3.config)
    assert torch.equal(greedy(tiny_gemma3, ids, cache), ref)
    assert [g.layers for g in cache.groups] == ([[2], [5]] if G == 1 else [[2, 5]])
    sliding = [layer for layer in cache.layers if isinstance(layer, StoredSlidingLayer)]
    assert len(sliding) == 4 and all(layer._keys.shape[-2] == 15 for layer in sliding)
    assert cache.memory_report()["rope_bytes"] == 0  # the full layers' RoPE, rebuilt from contiguous positions


def test_the_transform_coder_holds_its_ratio_of_the_models_own_16_bit_cache(tiny_gemma3):
    """At 4×, against what a 16-bit cache of this model holds (sliding layers at their window): the ratio
    asked for, every byte counted, the sliding windows counted as uncompressed."""
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(1))
    cfg = config_for_ratio(4, 400, tiny_gemma3.config, method="transform", layer_group_size=2, residual_length=8)
    cache = LowRankCache(cfg, tiny_gemma3.config)
    with torch.no_grad():
        tiny_gemma3(ids, **with_cache(cache))
    cache.compress_pending()
    rep = cache.memory_report()
    assert rep["dense16_bytes"] == 2 * (4 * 15 + 2 * 400) * 32 * 2
    assert rep["ratio"] == pytest.approx(4, rel=0.03)
    # every byte, but the sliding layers' window length (an int64 transformers keeps for masks) is no K/V
    assert rep["total_bytes"] == held_storage_bytes(cache) - 4 * 8
    assert rep["uncompressed_bytes"] >= 4 * 2 * 15 * 32 * 2  # the four sliding windows, bf16
    assert cache.path_counts()["gram transform int8"] == 2


def test_groups_form_over_full_attention_layers_and_other_layer_types_are_refused(tiny_gemma3):
    shape = ModelShape.of(tiny_gemma3.config)
    assert shape.layer_groups(2) == [[2, 5]] and shape.layer_groups(1, start_layer=3) == [[5]]
    assert config_for_ratio(2, 400, tiny_gemma3.config, method="xkv", layer_group_size=1).start_layer == 0
    cfg = tiny_gemma3.config.__class__(**{**tiny_gemma3.config.to_dict(),
                                           "layer_types": ["chunked_attention"] + ["full_attention"] * 5})
    with pytest.raises(ValueError, match="chunked_attention layers .* accepted: models whose layers are full_attention "
                                         "or sliding_attention"):
        LowRankCache(CompressionConfig.of(method="svd", layer_group_size=1, rank_k=8, rank_v=8), cfg)


@torch.no_grad()
def test_the_16_bit_dense_cache_of_a_hybrid_model_is_the_reference_itself(tiny_gemma3):
    """Dense16Cache given the model's config keeps its sliding layers at their window: exactly 1×, and the
    same logits as transformers' own sliding-aware DynamicCache up to bf16 storage."""
    from kvsvd.accounting import cache_report
    from kvsvd.dense import Dense16Cache
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    cache = Dense16Cache(tiny_gemma3.config)
    tiny_gemma3(ids, **with_cache(cache))
    assert cache_report(cache, tiny_gemma3.config, 40)["ratio"] == 1.0
    step = dict(position_ids=torch.tensor([[40]]), cache_position=torch.tensor([40]))
    ref_cache = DynamicCache(config=tiny_gemma3.config)
    tiny_gemma3(ids, **with_cache(ref_cache))
    ref = tiny_gemma3(ids[:, :1], **with_cache(ref_cache), **step).logits
    assert torch.allclose(tiny_gemma3(ids[:, :1], **with_cache(cache), **step).logits, ref, atol=1e-2)


@pytest.mark.peers
@pytest.mark.parametrize("spec", [{"method": "none"}, {"method": "dense16"},
                                  {"method": "quantized", "backend": "quanto", "nbits": 4, "residual_length": 8},
                                  {"method": "quantized", "backend": "hqq", "nbits": 4, "residual_length": 8},
                                  {"method": "turboquant", "nbits": 4}], ids=lambda s: "-".join(map(str, s.values())))
@torch.no_grad()
def test_the_peers_that_run_on_a_hybrid_model_are_counted_against_its_own_16_bit_cache(tiny_gemma3, spec):
    """The dense reference keeps the sliding layers' window; QuantizedCache and TurboQuant run; their bytes are
    what they hold."""
    from kvsvd import accounting, grid
    from kvsvd.evaluate import _prefill
    ids = torch.randint(3, 128, (1, 80), generator=torch.Generator().manual_seed(1))
    cache, press = grid.build(spec, tiny_gemma3, ids.shape[1])
    _prefill(tiny_gemma3, ids, cache, press)
    tiny_gemma3(ids[:, -1:], position_ids=torch.tensor([[80]]), **with_cache(cache))
    held = accounting.cache_report(cache, tiny_gemma3.config, 81)
    assert held["dense16_bytes"] == 2 * (2 * 81 + 4 * 15) * 32 * 2  # K+V × (2 full layers × 81 + 4 sliding × 15)
    if spec["method"] == "dense16":
        assert held["ratio"] == 1.0
    if spec["method"] == "none":  # FP32; a sliding layer's window is a view of its last update (16 tokens of storage)
        assert held["total_bytes"] == 4 * 2 * (2 * 81 + 4 * 16) * 32


@pytest.mark.peers
@pytest.mark.parametrize("press", ["streaming_llm", "snapkv", "tova", "expected_attention"])
def test_kvpress_presses_are_refused_on_a_hybrid_model_naming_why(tiny_gemma3, press):
    from kvsvd import grid
    with pytest.raises(ValueError, match=f"press='{press}' does not run on a model with sliding-window layers: kvpress"):
        grid.build({"method": "press", "press": press, "ratio": 4}, tiny_gemma3, 80)
