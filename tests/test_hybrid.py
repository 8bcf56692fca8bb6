"""LowRankCache on a hybrid-attention model (a tiny random Gemma 3): full-attention layers compressed; sliding
layers dense and capped at their window as transformers keeps them, or, for the transform coder, coded in groups
of their own whose segments are dropped as they leave the window; every byte counted."""

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


@pytest.mark.parametrize("tokens", [400, 100])
def test_the_transform_coder_holds_its_ratio_of_the_models_own_16_bit_cache(tiny_gemma3, tokens):
    """At 4×, against what a 16-bit cache of this model holds (sliding layers at their window): the ratio asked
    for, every byte counted. The sliding windows are coded too (groups [0, 1] and [3, 4] beside the full layers'
    [2, 5]), which makes 4× reachable at 100 tokens, where the dense windows alone would cap it at 4.3×."""
    ids = torch.randint(0, 128, (1, tokens), generator=torch.Generator().manual_seed(1))
    cfg = config_for_ratio(4, tokens, tiny_gemma3.config, method="transform", layer_group_size=2, residual_length=4)
    cache = LowRankCache(cfg, tiny_gemma3.config)
    assert [g.layers for g in cache.groups] == [[2, 5], [0, 1], [3, 4]]
    with torch.no_grad():
        tiny_gemma3(ids, **with_cache(cache))
    cache.compress_pending()
    rep = cache.memory_report()
    assert rep["dense16_bytes"] == 2 * (4 * 15 + 2 * tokens) * 32 * 2
    assert rep["ratio"] == pytest.approx(4, rel=0.03)
    assert rep["total_bytes"] == held_storage_bytes(cache)
    for group in cache.groups[1:]:  # the window's 15 tokens: 11 coded (no sinks: they left the window), 4 dense
        assert group.held_from == tokens - 15 and [s.length for s in group.segments] == [11]
        assert all(m.residual_length() == 4 for m in group.members)


def teacher_forced(model, seq: torch.Tensor, prompt: int, cache) -> torch.Tensor:
    """Next-token logits (steps, vocab) of the prefill of ``seq[:, :prompt]`` and of each later token fed one at
    a time: both caches see the same tokens, so their logits differ only by what the cache holds."""
    out = [model(seq[:, :prompt], **with_cache(cache)).logits[0, -1]]
    out += [model(seq[:, t:t + 1], **with_cache(cache)).logits[0, -1] for t in range(prompt, seq.shape[1] - 1)]
    return torch.stack(out)


@pytest.mark.parametrize("ratio, block_size", [(3, 512), (2.5, 2)])
@torch.no_grad()
def test_the_ratio_holds_at_the_end_of_the_timeline_though_the_16_bit_windows_stop_growing(tiny_gemma3, ratio,
                                                                                        block_size):
    """A 100-token prompt and 6 reserved tokens (a question and its answer): a 16-bit cache's sliding layers hold
    no more once their window is full, while every coded layer holds the reserved tokens (dense up to a block,
    coded beyond it in blocks at 1/ratio of their 16-bit bytes); the allocation budgets them, so the ratio is met
    at the end of the timeline."""
    ids = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(5))
    cfg = config_for_ratio(ratio, 100, tiny_gemma3.config, method="transform", layer_group_size=2, reserve_tokens=6,
                           residual_length=2, block_size=block_size)
    cache = LowRankCache(cfg, tiny_gemma3.config)
    greedy(tiny_gemma3, ids, cache, n=7)
    rep = cache.memory_report()
    assert cache.get_seq_length() == 106 and rep["dense16_bytes"] == 2 * (4 * 15 + 2 * 106) * 32 * 2
    assert rep["ratio"] == pytest.approx(ratio, rel=0.05)


@torch.no_grad()
def test_coded_windows_attend_what_the_dense_cache_attends(tiny_gemma3):
    """40 tokens past a 60-token prompt (window 16, no new block coded): the prefill's coded window segment
    straddles the window's edge, the model's mask hiding its older tokens, until it has left the window and is
    dropped with its basis (a window of 16 never reaches a window of 4 plus a block of 64, so no block is coded on
    it). At a ratio that leaves most columns 8 bits the logits stay within a few % of the
    logits' spread of DynamicCache's on the same tokens, and as the coded tokens leave the windows the
    difference falls to the full layers' share."""
    seq = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(4))
    dense = teacher_forced(tiny_gemma3, seq, 60, DynamicCache(config=tiny_gemma3.config))
    cfg = config_for_ratio(1.1, 60, tiny_gemma3.config, method="transform", layer_group_size=2, residual_length=4,
                           block_size=64, basis_dtype="bf16")
    cache = LowRankCache(cfg, tiny_gemma3.config)
    err = (teacher_forced(tiny_gemma3, seq, 60, cache) - dense).abs().amax(-1)
    assert [len(g.retained) for g in cache.groups] == [0, 0, 0] and not cache.groups[1].segments
    assert float(err.max()) < 0.2 * float(dense.std()) and float(err[-10:].max()) < 0.05 * float(dense.std())


@torch.no_grad()
def test_coded_windows_drop_what_leaves_them_on_both_attention_paths(tiny_gemma3, monkeypatch):
    """New blocks of 4 coded as the window moves: a sliding group drops each segment that has left its window,
    keeps the prefill's basis for the blocks coded on it, never holds more than the window and a block, counts
    every byte it holds, and the kvsvd attention (the segments' latent forms, masked from ``held_from``; the
    codes read without dequantising them, FOLD_FROM lowered to 1 for these short segments) gives the logits of
    reading the same cache through SDPA."""
    from kvsvd.methods import transform
    from test_attention import attn
    monkeypatch.setattr(transform, "FOLD_FROM", 1)
    seq = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(4))
    cfg = config_for_ratio(1.5, 60, tiny_gemma3.config, method="transform", layer_group_size=2, residual_length=4,
                           block_size=4)
    runs = []
    for impl in ("sdpa", "kvsvd"):
        with attn(tiny_gemma3, impl):
            cache = LowRankCache(cfg, tiny_gemma3.config)
            runs.append(teacher_forced(tiny_gemma3, seq, 60, cache))
        for group in cache.groups[1:]:
            held = group.members[0].get_seq_length() - group.held_from
            assert 15 <= held <= 15 + 4 and group.held_from > 60 and len(group.retained) == 1
            end = group.members[0].get_seq_length()  # the next step's mask: from a held token, every one in its window
            length, first = group.members[0].get_mask_sizes(1)
            assert group.held_from <= first <= end - 15 and length == end - first + 1
        assert cache.memory_report()["total_bytes"] == held_storage_bytes(cache)
    # each run codes its new blocks from its own K/V: the two paths' float rounding (~1e-7 per attention call,
    # sums in another order) can move a value across a quantiser step, which this random model then carries on
    assert (runs[0] - runs[1]).abs().max() < 2e-3
    first = cache.groups[1].held_from
    with pytest.raises(ValueError, match=rf"max_length=60 needs positions from 45 in the sliding layers \[0, 1\], "
                                         rf"which hold positions from {first} only .* accepted: >= {first + 15}"):
        cache.crop(60)
    assert cache.get_seq_length() == 99  # nothing was cut
    cache.crop(first + 15)
    assert cache.get_seq_length() == first + 15 and cache.memory_report()["total_bytes"] == held_storage_bytes(cache)


def test_a_method_that_codes_the_windows_codes_all_of_them(tiny_gemma3):
    with pytest.raises(ValueError, match=r"method='transform' codes the sliding-window layers.* leave sliding layers "
                                         r"\[0, 1\] out; accepted: a range holding every sliding layer"):
        LowRankCache(CompressionConfig.of(method="transform", layer_group_size=2, start_layer=2), tiny_gemma3.config)


def test_groups_form_over_full_attention_layers_and_other_layer_types_are_refused(tiny_gemma3):
    shape = ModelShape.of(tiny_gemma3.config)
    assert shape.layer_groups(2) == [[2, 5]] and shape.layer_groups(1, start_layer=3) == [[5]]
    assert shape.layer_groups(2, sliding=True) == [[2, 5], [0, 1], [3, 4]]
    assert shape.layer_groups(3, start_layer=1, sliding=True) == [[2, 5], [1, 3, 4]]
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
    from kvsvd.evaluate import prefill_context
    ids = torch.randint(3, 128, (1, 80), generator=torch.Generator().manual_seed(1))
    cache, press = grid.build(spec, tiny_gemma3, ids.shape[1])
    prefill_context(tiny_gemma3, ids, cache, press)
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
