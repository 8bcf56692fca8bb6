"""kvsvd.accounting: bytes held against a 16-bit cache, for kvsvd's caches and for the peers'."""

import json

import pytest
import torch
from transformers import DynamicCache, QuantizedCache

from kvsvd import accounting
from kvsvd.compat import with_cache
from kvsvd.dense import Dense16Cache
from kvsvd.results import validate_row
from conftest import held_storage_bytes

pytestmark = pytest.mark.core  # also run in the current environment


def test_dense16_bytes_is_two_bytes_per_entry_whatever_the_model_dtype(tiny_llama):
    assert accounting.dense16_bytes(tiny_llama.config, 100, batch=3) == 2 * 3 * 100 * 4 * 2 * 16 * 2


@pytest.mark.peers
@torch.no_grad()
def test_quantized_cache_bytes_are_its_codes_scales_shifts_and_residual(tiny_llama):
    """quanto's int4 QuantizedCache, counted tensor by tensor: packed uint8 codes, FP32 scales and shifts
    per group of 64, and the residual window in the model dtype."""
    cache = QuantizedCache(backend="quanto", config=tiny_llama.config, nbits=4, residual_length=8)
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(0))
    tiny_llama(ids, **with_cache(cache))
    for t in range(12):  # past the residual length once: the history is requantised, 4 tokens stay dense
        tiny_llama(ids[:, t:t + 1], **with_cache(cache))
    codes = scales = residual = 0
    for layer in cache.layers:
        for q in (layer._quantized_keys, layer._quantized_values):
            codes += q._data._data.numel()  # uint8, two 4-bit codes per byte
            scales += 4 * (q._scale.numel() + q._shift.numel())
        residual += 4 * (layer.keys.numel() + layer.values.numel())
    rep = accounting.cache_report(cache, tiny_llama.config, 112)
    assert (rep["codes_bytes"], rep["scales_bytes"], rep["residual_bytes"]) == (codes, scales, residual)
    assert codes == 4 * 2 * 108 * 2 * 16 // 2 and residual == 4 * 2 * 4 * 2 * 16 * 4
    assert rep["total_bytes"] == codes + scales + residual
    assert rep["dense16_bytes"] == 2 * 112 * 4 * 2 * 16 * 2 and rep["ratio"] == rep["dense16_bytes"] / rep["total_bytes"]


@pytest.mark.peers
@torch.no_grad()
def test_hqq_quantized_cache_bytes_are_its_packed_codes_scales_zeros_and_residual(tiny_llama):
    """HQQ's 3-bit QuantizedCache: codes bit-packed into int32 (10 per word), FP32 scale and zero per
    group of 64, the residual in the model dtype."""
    cache = QuantizedCache(backend="hqq", config=tiny_llama.config, nbits=3, residual_length=8)
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(0))
    tiny_llama(ids, **with_cache(cache))
    codes = scales = residual = 0
    for layer in cache.layers:
        for q, meta in (layer._quantized_keys, layer._quantized_values):
            assert q.dtype == torch.int32
            codes += 4 * q.numel()
            scales += 4 * (meta["scale"].numel() + meta["zero"].numel())
        residual += 4 * (layer.keys.numel() + layer.values.numel())
    rep = accounting.cache_report(cache, tiny_llama.config, 100)
    assert (rep["codes_bytes"], rep["scales_bytes"], rep["residual_bytes"]) == (codes, scales, residual)
    assert codes == 4 * 2 * 4 * 7 * 50  # layers × K/V × 4 bytes × ⌈64/10⌉ words per group × 50 groups of 64
    assert rep["total_bytes"] == codes + scales + residual


@pytest.mark.peers
@torch.no_grad()
def test_turboquant_bytes_are_its_uint8_indices_norms_and_window_and_its_view_is_apart(tiny_llama):
    """TurboQuantCache keeps one uint8 index per entry (not bit-packed: 1 byte whatever the bits), an FP32
    norm per vector and a 128-token window in the model dtype, a slice of the step's tensor (whose storage
    it keeps whole); its dequantised view of the timeline, kept between steps, is reported as
    rebuilt_bytes, apart from the total."""
    from turboquant import TurboQuantCache
    cache = TurboQuantCache(bits=3)
    ids = torch.randint(0, 128, (1, 301), generator=torch.Generator().manual_seed(0))
    tiny_llama(ids[:, :300], **with_cache(cache))
    prefill = accounting.cache_report(cache, tiny_llama.config, 300)
    assert prefill["residual_bytes"] == 4 * 2 * 2 * 300 * 16 * 4  # the window is a view of all 300 prefill tokens
    tiny_llama(ids[:, 300:], **with_cache(cache), position_ids=torch.tensor([[300]]))
    rep = accounting.cache_report(cache, tiny_llama.config, 301)
    entries = 4 * 2 * 2 * 173 * 16  # layers × K/V × heads × quantised tokens × head_dim
    assert rep["codes_bytes"] == entries and rep["scales_bytes"] == 4 * entries // 16
    assert rep["residual_bytes"] == 4 * 2 * 2 * 129 * 16 * 4  # 128 + 1 tokens of the step's concatenation, FP32
    assert rep["rebuilt_bytes"] == 4 * 2 * 2 * 301 * 16 * 4  # the K and V views of all 301 tokens, FP32
    assert rep["total_bytes"] == rep["codes_bytes"] + rep["scales_bytes"] + rep["residual_bytes"]
    assert rep["ratio"] < 2  # 16-bit entries against 8-bit indices plus norms and an FP32 window


@torch.no_grad()
def test_dense16_cache_holds_bf16_and_reads_the_model_dtype(tiny_llama):
    ids = torch.randint(0, 128, (2, 60), generator=torch.Generator().manual_seed(1))
    ref, cache = DynamicCache(), Dense16Cache()
    ref_logits = tiny_llama(ids, **with_cache(ref)).logits
    logits = tiny_llama(ids, **with_cache(cache)).logits
    step = tiny_llama(ids[:, :1], **with_cache(cache)).logits
    ref_step = tiny_llama(ids[:, :1], **with_cache(ref)).logits
    assert torch.equal(logits, ref_logits)  # a step attends its own new tokens as computed, the rest as stored
    assert (step - ref_step).abs().max() < 2e-2 and not torch.equal(step, ref_step)
    layer = cache.layers[0]
    assert layer._keys.dtype == torch.bfloat16 and layer.keys.dtype == torch.float32 and layer.get_seq_length() == 61
    rep = accounting.cache_report(cache, tiny_llama.config, 61, batch=2)
    assert rep["uncompressed_bytes"] == rep["total_bytes"] == held_storage_bytes(cache) == rep["dense16_bytes"]
    assert rep["ratio"] == 1.0
    assert accounting.cache_report(ref, tiny_llama.config, 61, batch=2)["ratio"] == 0.5  # FP32 dense


@pytest.mark.peers
@torch.no_grad()
def test_a_press_prunes_the_dense16_cache_in_its_storage_dtype(tiny_llama):
    from kvpress import KnormPress
    ids = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(2))
    cache = Dense16Cache()
    with KnormPress(compression_ratio=0.5)(tiny_llama):
        tiny_llama.model(ids, **with_cache(cache))
    assert cache.get_seq_length() == 40 and cache.layers[0]._keys.dtype == torch.bfloat16
    assert accounting.cache_report(cache, tiny_llama.config, 80)["ratio"] == 2.0


def test_report_refuses_an_unknown_kind_and_counts_shared_storage_once():
    t = torch.zeros(10, dtype=torch.bfloat16)
    rep = accounting.report({"factors": [t, t[:5]], "residual": [t]}, 80)
    assert rep["factors_bytes"] == 20 and rep["residual_bytes"] == 0 and rep["ratio"] == 4.0
    with pytest.raises(ValueError, match=r"kinds \['weights'\] are unknown"):
        accounting.report({"weights": [t]}, 80)


def test_a_grid_row_with_a_ratio_must_name_its_paths():
    validate_row({"key": "a", "kv_ratio": 2.0, "paths": {"gram bf16": 8}})
    with pytest.raises(ValueError, match="has kv_ratio but no paths"):
        validate_row({"key": json.dumps(["x"]), "kv_ratio": 2.0})


def test_model_shape_reads_layers_heads_and_layer_types(tiny_llama):
    """One shape for every byte budget: a dense model's layers are all full attention; a hybrid config's
    layer types and sliding window are read as they are."""
    from transformers import Gemma3TextConfig
    shape = accounting.ModelShape.of(tiny_llama.config)
    assert shape == accounting.ModelShape(4, 2, 16, ("full_attention",) * 4, None) and shape.features == 32
    gemma = Gemma3TextConfig(num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                             hidden_size=64, intermediate_size=64, vocab_size=128, sliding_window=16)
    hybrid = accounting.ModelShape.of(gemma)
    assert hybrid.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert (hybrid.layers, hybrid.kv_heads, hybrid.head_dim, hybrid.sliding_window) == (6, 1, 32, 16)


def test_the_16_bit_reference_of_a_hybrid_model_caps_sliding_layers_as_transformers_does():
    """A tiny random Gemma 3 (5 sliding layers of window 16, 1 full layer): after 40 tokens transformers'
    own DynamicCache holds 15 tokens on each sliding layer and 40 on the full one, and the 16-bit
    reference counts exactly that (half of what the FP32 model's cache holds)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                           hidden_size=64, intermediate_size=64, vocab_size=128, sliding_window=16)
    model = Gemma3ForCausalLM(cfg).eval()
    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 40)), **with_cache(cache))
    assert [layer.keys.shape[-2] for layer in cache.layers] == accounting.ModelShape.of(cfg).tokens_held(40)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert accounting.dense16_bytes(cfg, 40) == held // 2 == 2 * (5 * 15 + 40) * 32 * 2
