"""LowRankCache: exactness at full rank, honest bytes, RoPE round trip, generate/batch/kvpress."""

import copy

import pytest
import torch
from transformers import DynamicCache

from kvsvd import CompressionConfig, LowRankCache
from kvsvd.compat import with_cache
from kvsvd.config import config_for_ratio
from kvsvd.store import dequantize_rows, quantize_rows
from conftest import held_storage_bytes

pytestmark = pytest.mark.core  # also run in the current environment

FULL = {"svd": 1, "xkv": 2}


def greedy(model, ids, cache, n=8, **kw):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, **with_cache(cache), return_dict_in_generate=True,
                         output_logits=True, pad_token_id=0,
                         attention_mask=kw.pop("attention_mask", torch.ones_like(ids)), **kw)
    return out.sequences, torch.stack(out.logits)


def full_rank_config(method, G, F, key_space, **kw):
    return CompressionConfig.of(method=method, layer_group_size=G, rank_k=G * F, rank_v=G * F, key_space=key_space,
                             factor_dtype="fp32", dense_dtype="fp32", residual_length=3,
                             block_size=kw.pop("block_size", 200), **kw)


@pytest.mark.parametrize("method", ["svd", "xkv"])
@pytest.mark.parametrize("key_space", ["pre_rope", "post_rope"])
def test_full_rank_reproduces_dynamic_cache_tiny(tiny_llama, method, key_space):
    ids = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(1))
    ref_seq, ref_logits = greedy(tiny_llama, ids, DynamicCache())
    cache = LowRankCache(full_rank_config(method, FULL[method], 32, key_space, block_size=4), tiny_llama.config)
    seq, logits = greedy(tiny_llama, ids, cache, n=12)
    assert torch.equal(seq[:, :ref_seq.shape[1]], ref_seq)
    assert (logits[:ref_logits.shape[0]] - ref_logits).abs().max() < 1e-4
    assert sum(len(g.segments) for g in cache.groups) >= 2  # prefill segment + decode blocks


@pytest.mark.model
@pytest.mark.parametrize("method, G", [("svd", 1), ("xkv", 2)])
def test_full_rank_reproduces_dynamic_cache_smollm2(smollm2, method, G):
    model, tok = smollm2
    ids = tok("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt").input_ids
    ref_seq, ref_logits = greedy(model, ids, DynamicCache())
    seq, logits = greedy(model, ids, LowRankCache(full_rank_config(method, G, 192, "pre_rope"), model.config))
    assert torch.equal(seq, ref_seq)
    assert (logits - ref_logits).abs().max() < 1e-4


def test_pre_rope_keys_round_trip(tiny_llama):
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    dyn = DynamicCache()
    tiny_llama(ids, **with_cache(dyn))
    cache = LowRankCache(full_rank_config("svd", 1, 32, "pre_rope"), tiny_llama.config)
    tiny_llama(ids, **with_cache(cache))
    cache.compress_pending()
    assert cache.groups[0].segments and cache.groups[0].segments[0].length == 37
    for layer, ref in zip(cache.layers, dyn.layers):
        assert torch.allclose(layer.keys, ref.keys, atol=1e-5)
        assert torch.allclose(layer.values, ref.values, atol=1e-5)


@pytest.mark.parametrize("method, G, factor_dtype", [
    (m, g, dt) for m, g in (("svd", 1), ("xkv", 2)) for dt in ("fp32", "bf16", "int8", "int4")
] + [("minicache", 2, "fp32"), ("minicache", 2, "bf16")])
def test_memory_report_counts_the_tensors_actually_held(tiny_llama, method, G, factor_dtype):
    ids = torch.randint(0, 128, (2, 120), generator=torch.Generator().manual_seed(3))
    ranks = {} if method == "minicache" else {"rank_k": 8 * G, "rank_v": 12 * G}  # minicache has none
    cfg = CompressionConfig.of(method=method, layer_group_size=G, start_layer=0, end_layer=-1, factor_dtype=factor_dtype,
                            residual_length=5, block_size=16, **ranks)
    cache = LowRankCache(cfg, tiny_llama.config)
    greedy(tiny_llama, ids, cache, n=24)
    rep = cache.memory_report()
    assert rep["total_bytes"] == held_storage_bytes(cache)
    tokens = cache.get_seq_length()
    assert rep["dense16_bytes"] == 2 * 2 * tokens * 4 * 32 * 2  # K+V × batch × tokens × layers × F × 16 bits
    assert rep["ratio"] == rep["dense16_bytes"] / rep["total_bytes"]
    if method != "minicache":
        assert rep["factors_bytes"] > 0 and (rep["ratio"] > 1.0 or factor_dtype == "fp32")
    assert (rep["scales_bytes"] > 0) == factor_dtype.startswith("int")


@pytest.mark.parametrize("method, G, factor_dtype, key_space", [
    ("xkv", 2, "int8", "pre_rope"), ("svd", 1, "bf16", "post_rope"), ("minicache", 2, "fp32", "post_rope")])
def test_memoized_reads_are_the_same_reads_computed_once(tiny_llama, method, G, factor_dtype, key_space):
    """memoize_reads changes when the segments are rebuilt, not what: the same logits bit for bit, also
    when decode compresses new blocks (the memo is then renewed); its copies are reported apart."""
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(6))
    ranks = {} if method == "minicache" else {"rank_k": 8 * G, "rank_v": 12 * G}  # minicache has none
    cfg = CompressionConfig.of(method=method, layer_group_size=G, start_layer=0, end_layer=-1, factor_dtype=factor_dtype,
                            key_space=key_space, residual_length=5, block_size=8, **ranks)
    plain, memo = LowRankCache(cfg, tiny_llama.config), LowRankCache(cfg, tiny_llama.config, memoize_reads=True)
    seq, logits = greedy(tiny_llama, ids, plain, n=24)
    seq_memo, logits_memo = greedy(tiny_llama, ids, memo, n=24)
    assert torch.equal(seq, seq_memo) and torch.equal(logits, logits_memo)
    assert len(memo.groups[0].segments) > 1  # decode added segments after the prefill's
    rep, rep_memo = plain.memory_report(), memo.memory_report()
    assert rep["rebuilt_bytes"] == 0 and rep_memo["total_bytes"] == rep["total_bytes"]
    dense_segments = sum(2 * G * 2 * g.compressed_length * 16 * 4 for g in memo.groups)  # K+V × layers × heads × d × fp32
    assert rep_memo["rebuilt_bytes"] == dense_segments


@pytest.mark.parametrize("factor_dtype", ["fp32", "bf16", "int8", "int4"])
@torch.no_grad()
def test_config_for_ratio_budgets_the_factor_width(tiny_llama, factor_dtype):
    """The ratio asked for is the ratio held, whatever the factor width: narrower factors buy rank."""
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(5))
    cfg = config_for_ratio(4, 400, tiny_llama.config, method="xkv", layer_group_size=2, residual_length=4,
                           factor_dtype=factor_dtype)
    fp32 = config_for_ratio(4, 400, tiny_llama.config, method="xkv", layer_group_size=2, residual_length=4,
                            factor_dtype="fp32")
    assert cfg.params.rank_v >= {"fp32": 1, "bf16": 1.8, "int8": 3, "int4": 4}[factor_dtype] * fp32.params.rank_v
    cache = LowRankCache(cfg, tiny_llama.config)
    tiny_llama(ids, **with_cache(cache))
    cache.compress_pending()
    rep = cache.memory_report()
    assert rep["ratio"] == pytest.approx(4, rel=0.03)
    assert rep["rope_bytes"] == 0  # contiguous positions: the rotation is rebuilt from them
    with pytest.raises(ValueError, match="ratio=1.5 with factor_dtype='int4' asks for ranks .* above the full rank"):
        config_for_ratio(1.5, 400, tiny_llama.config, method="xkv", layer_group_size=2, factor_dtype="int4")


def test_quantised_rows_round_trip():
    x = torch.randn(3, 50, 17)
    for bits, tol in ((8, 1 / 127), (4, 1 / 7)):
        q, scale = quantize_rows(x, bits)
        assert q.dtype == (torch.int8 if bits == 8 else torch.uint8)
        assert q.shape[-1] == (17 if bits == 8 else 9) and scale.shape == (3, 50, 1)
        y = dequantize_rows(q, scale, bits, 17, torch.float32)
        assert ((y - x).abs() <= 0.51 * tol * x.abs().amax(-1, keepdim=True) * 1.01).all()


@torch.no_grad()
def test_reduced_rank_keeps_the_answer_close(tiny_llama):
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(4))
    ref = DynamicCache()
    ref_logits = tiny_llama(ids, **with_cache(ref)).logits[:, -1]
    cache = LowRankCache(CompressionConfig.of(method="xkv", layer_group_size=2, rank_k=16, rank_v=24, residual_length=0),
                         tiny_llama.config)
    tiny_llama(ids[:, :-1], **with_cache(cache))
    copied = copy.deepcopy(cache)  # what teacher forcing decodes on
    logits = tiny_llama(ids[:, -1:], **with_cache(cache)).logits[:, -1]
    assert cache.memory_report()["ratio"] > 1.5
    assert torch.nn.functional.cosine_similarity(logits, ref_logits).item() > 0.95
    assert copied.model_config is cache.model_config and copied.get_seq_length() == 199  # untouched by the step
    assert torch.equal(tiny_llama(ids[:, -1:], **with_cache(copied)).logits[:, -1], logits)


def test_batch_with_left_padding_and_repeated_generate(tiny_llama):
    ids = torch.randint(3, 128, (2, 60), generator=torch.Generator().manual_seed(5))
    ids[1, :10] = 0
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    ref_seq, ref_logits = greedy(tiny_llama, ids, DynamicCache(), attention_mask=mask)
    cache = LowRankCache(full_rank_config("xkv", 2, 32, "pre_rope"), tiny_llama.config)
    seq, logits = greedy(tiny_llama, ids, cache, attention_mask=mask)
    assert torch.equal(seq, ref_seq) and (logits - ref_logits).abs().max() < 1e-4
    # a second generate call continues on the same cache
    more = torch.cat([seq, torch.randint(3, 128, (2, 5))], dim=1)
    dyn = DynamicCache()
    greedy(tiny_llama, ids, dyn, attention_mask=mask)
    m2 = torch.cat([mask, torch.ones(2, more.shape[1] - ids.shape[1], dtype=mask.dtype)], dim=1)
    r2, _ = greedy(tiny_llama, more, dyn, attention_mask=m2)
    s2, _ = greedy(tiny_llama, more, cache, attention_mask=m2)
    assert torch.equal(s2, r2)


def test_context_shorter_than_the_rank_is_stored_uncompressed(tiny_llama):
    ids = torch.randint(0, 128, (1, 20))
    cache = LowRankCache(CompressionConfig.of(method="svd", layer_group_size=1, rank_k=30, rank_v=30, residual_length=2),
                         tiny_llama.config)
    greedy(tiny_llama, ids, cache, n=2)
    rep = cache.memory_report()
    assert rep["factors_bytes"] == 0 and rep["uncompressed_bytes"] > 0


def test_compression_log_records_time_and_rsvd_stages(tiny_llama):
    cache = LowRankCache(CompressionConfig.of(method="xkv", layer_group_size=2, rank_k=16, rank_v=16, qr="householder"),
                         tiny_llama.config)
    tiny_llama(torch.randint(0, 128, (1, 100)), **with_cache(cache))
    cache.compress_pending()
    assert len(cache.compression_log) == 2
    entry = cache.compression_log[0]
    assert entry["layers"] == [0, 1] and entry["tokens"] == 100 - 32 and entry["ms"] > 0
    assert "power_iteration" in entry["breakdown_ms"]


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, pattern", [
    ({"method": ""}, "method='' is unknown"),
    ({"method": "svd2"}, "method='svd2' is unknown; accepted: svd, xkv"),
    ({"layer_group_size": 0}, r"layer_group_size=0 is out of range; accepted: >= 1"),
    ({"method": "svd", "layer_group_size": 2}, "layer_group_size=2 does not fit method='svd'"),
    ({"start_layer": 5, "end_layer": 2}, "start_layer=5 > end_layer=2"),
    ({"rank_k": 0}, "rank_k=0"),
    ({"key_space": "rope"}, "key_space='rope'"),
    ({"factor_dtype": "int2"}, "factor_dtype='int2'"),
    ({"method": "pca", "layer_group_size": 1}, "calibration_path"),
    ({"qr": "lu"}, "qr='lu'"),
])
def test_bad_config_names_the_parameter(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        CompressionConfig.of(**kwargs)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"method": "xkv", "layer_group_size": 2, "rank_k": 65}, r"rank_k=65 exceeds the 64 features"),
    ({"method": "svd", "layer_group_size": 1, "rank_k": 8, "rank_v": 33}, r"rank_v=33 exceeds the 32 features"),
    ({"method": "xkv", "layer_group_size": 3, "rank_k": 8, "rank_v": 8}, "layer_group_size=3 does not divide"),
    ({"method": "svd", "layer_group_size": 1, "end_layer": 4, "rank_k": 8, "rank_v": 8}, r"end_layer=4 is out of range"),
])
def test_bad_config_for_the_model_names_the_parameter(tiny_llama, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        LowRankCache(CompressionConfig.of(**kwargs), tiny_llama.config)


def test_beam_search_is_refused_clearly(tiny_llama):
    cache = LowRankCache(CompressionConfig.of(method="svd", layer_group_size=1, rank_k=8, rank_v=8), tiny_llama.config)
    with pytest.raises(NotImplementedError, match="num_beams"):
        tiny_llama.generate(torch.randint(0, 128, (1, 50)), num_beams=2, max_new_tokens=3, **with_cache(cache),
                            pad_token_id=0, attention_mask=torch.ones(1, 50, dtype=torch.long))


@torch.no_grad()
def test_memory_report_is_the_same_for_an_fp32_and_a_bf16_model(tiny_llama):
    """Bytes are against a 16-bit cache and the cache holds 16-bit tensors whatever the model computes
    in: the same held bytes, the same ratio."""
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(7))
    bf16 = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    bf16.model.rotary_emb.inv_freq = tiny_llama.model.rotary_emb.inv_freq.clone()  # FP32, as from_pretrained leaves it
    cfg = config_for_ratio(4, 150, tiny_llama.config, method="xkv", layer_group_size=2, residual_length=8,
                           factor_dtype="int8")
    reports = []
    for model in (tiny_llama, bf16):
        cache = LowRankCache(cfg, model.config)
        model(ids, **with_cache(cache))
        cache.compress_pending()
        reports.append(cache.memory_report())
        assert reports[-1]["total_bytes"] == held_storage_bytes(cache)
    assert reports[0] == reports[1]
    assert reports[0]["ratio"] == pytest.approx(4, rel=0.05)


def test_path_counts_name_what_ran(tiny_llama):
    """qr="auto": the exact Gram path on narrow matrices (one layer, n = 32 features), the randomized path
    on wide ones (a group of 3 layers, n = 96); layers outside the range are dense bf16."""
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(8))
    for method, G, start, expected in (("svd", 1, 0, {"gram bf16": 8}),
                                       ("xkv", 3, 1, {"randomized q2 p8 bf16": 2, "dense bf16": 2})):
        cache = LowRankCache(CompressionConfig.of(method=method, layer_group_size=G, start_layer=start, rank_k=8,
                                               rank_v=12, residual_length=4), tiny_llama.config)
        tiny_llama(ids, **with_cache(cache))
        cache.compress_pending()
        assert cache.path_counts() == expected
        assert cache.compression_log[0]["paths"] == [next(iter(expected))] * 2


@torch.no_grad()
def test_pre_rope_keys_at_positions_that_are_not_contiguous_are_rotated_back_exactly(tiny_llama):
    """Positions 0, 2, 4, … per sequence, shifted by 3 in the second: the cache holds them (int32, 4 bytes
    per token) where the model passes its positions, or the cos/sin it was given where the positions it
    passes (5.2's cache_position) do not rebuild them; either way the keys read back are the model's."""
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(7))
    positions = torch.arange(0, 80, 2)[None] + torch.tensor([[0], [3]])
    dyn, cache = DynamicCache(), LowRankCache(full_rank_config("svd", 1, 32, "pre_rope"), tiny_llama.config)
    tiny_llama(ids, position_ids=positions, **with_cache(dyn))
    tiny_llama(ids, position_ids=positions, **with_cache(cache))
    cache.compress_pending()
    assert cache.memory_report()["rope_bytes"] in (2 * 40 * 4, 2 * 2 * 40 * 8 * 4)  # int32 positions, or the FP32
    # cos and sin at half width (head_dim 16)
    for layer, ref in zip(cache.layers, dyn.layers):
        assert torch.allclose(layer.keys, ref.keys, atol=1e-5)
