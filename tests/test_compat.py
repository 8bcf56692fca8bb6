"""kvsvd on the installed transformers: the adapter (kvsvd.compat) and every LowRankCache method
generating through ``model.generate`` on the tiny random Llama and on SmolLM2. The module runs in
both environments: the workbook's (transformers 5.2, with the peers) and the current one."""

import inspect
import shutil
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvsvd
from kvsvd import CompressionConfig, LowRankCache, compat, figures
from kvsvd.__main__ import main
from kvsvd.config import METHODS, config_for_ratio
from kvsvd.dense import Dense16Cache
from conftest import ByteTokenizer, held_storage_bytes

pytestmark = pytest.mark.core


def test_the_cache_argument_is_the_one_the_model_declares(tiny_llama):
    assert compat.CACHE_ARG in inspect.signature(type(tiny_llama).forward).parameters
    assert compat.with_cache("c") == {compat.CACHE_ARG: "c"}
    assert compat.cache_of({compat.CACHE_ARG: "c", "x": 1}) == "c"


def test_update_extras_reads_both_call_forms():
    cos = torch.ones(1, 2, 4)
    assert compat.update_extras(({"cos": cos, "sin": cos},), {}) == {"cos": cos, "sin": cos}   # 5.2: cache_kwargs
    assert compat.update_extras((), {"kwargs": {"position_ids": 3}}) == {"position_ids": 3}    # later: kwargs=
    assert compat.update_extras((), {}) == {}


def test_query_length_accepts_a_cache_position_or_an_int():
    assert compat.query_length(torch.arange(5, 12)) == 7
    assert compat.query_length(7) == 7


@pytest.mark.parametrize("rope_parameters", [None, {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
                                             {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                              "rope_theta": 500000.0}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cos_sin_from_positions_are_the_models_own(rope_parameters, dtype):
    """What a transformers that passes only position_ids leaves the cache to rebuild: bit for bit the
    cos/sin the model's rotary module applied, in the key dtype."""
    kw = {} if rope_parameters is None else {"rope_parameters": rope_parameters}
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **kw)
    rotary = LlamaForCausalLM(cfg).model.rotary_emb
    positions = torch.tensor([[0, 1, 2, 3, 300, 301], [7, 8, 9, 10, 11, 12]])
    cos, sin = rotary(torch.zeros(2, 6, 64, dtype=dtype), positions)
    got_cos, got_sin = compat.rope_of_update({"position_ids": positions}, cfg, dtype)
    assert got_cos.dtype == dtype and torch.equal(got_cos, cos) and torch.equal(got_sin, sin)
    assert compat.rope_of_update({}, cfg, dtype) is None


def test_position_dependent_rope_is_refused_by_name():
    cfg = LlamaConfig(num_attention_heads=4, hidden_size=64,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope_type='dynamic'.*key_space='post_rope'"):
        compat.rope_of_update({"position_ids": torch.arange(4)[None]}, cfg, torch.float32)


def test_crop_to_keeps_the_first_tokens(tiny_llama):
    cache = DynamicCache()
    tiny_llama(torch.randint(0, 128, (1, 20)), **compat.with_cache(cache))
    keys = cache.layers[0].keys.clone()
    compat.crop_to(cache, 20)
    assert cache.get_seq_length() == 20
    compat.crop_to(cache, 12)
    assert cache.get_seq_length() == 12 and torch.equal(cache.layers[0].keys, keys[..., :12, :])
    with pytest.raises(ValueError, match="length=13 exceeds the 12 tokens held"):
        compat.crop_to(cache, 13)


def test_layers_answer_both_layer_contracts(tiny_llama):
    cache = LowRankCache(config_for_ratio(2, 64, tiny_llama.config, layer_group_size=2, residual_length=8),
                         tiny_llama.config)
    tiny_llama(torch.randint(0, 128, (1, 64)), **compat.with_cache(cache))
    layer = cache.layers[0]
    assert layer.get_mask_sizes(torch.arange(64, 67)) == layer.get_mask_sizes(3) == (67, 0)
    assert layer.get_max_length() == layer.get_max_cache_shape() == -1


def test_a_reset_dense16_cache_starts_over(tiny_llama):
    """reset() drops the stored tensors (the current contract) on both releases."""
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(5))
    fresh = tiny_llama(ids, **compat.with_cache(Dense16Cache())).logits
    cache = Dense16Cache()
    tiny_llama(ids[:, :10], **compat.with_cache(cache))
    cache.reset()
    assert cache.get_seq_length() == 0
    assert torch.equal(tiny_llama(ids, **compat.with_cache(cache)).logits, fresh)


def method_config(method: str, model, tokenizer, tokens: int, ratio: float, path) -> CompressionConfig:
    """Each LowRankCache method at ``ratio`` (minicache: its merge; pca: rank 8) for ``tokens`` tokens of context."""
    if method == "minicache":
        return CompressionConfig.of(method="minicache", layer_group_size=2, residual_length=8)
    if method == "pca":
        rank = 8
        calibration = kvsvd.calibrate(model, tokenizer, ["Water boils at one hundred degrees. " * 12], rank, rank,
                                      path / "calibration.safetensors")
        return CompressionConfig.of(method="pca", layer_group_size=1, rank_k=rank, rank_v=rank, residual_length=8,
                                 calibration_path=str(calibration))
    G = 1 if method == "svd" else 2
    return config_for_ratio(ratio, tokens, model.config, method=method, layer_group_size=G, residual_length=8,
                            block_size=16)


def generate_with_every_method(model, tokenizer, ids, ratio, path) -> dict[str, LowRankCache]:
    """Greedy generate 12 tokens with each method's cache; checks what each cache holds."""
    caches = {}
    for method in METHODS:
        cfg = method_config(method, model, tokenizer, ids.shape[1], ratio, path)
        cache = LowRankCache(cfg, model.config)
        out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones_like(ids), **compat.with_cache(cache))
        assert out.shape == (1, ids.shape[1] + 12), method
        assert all(group.segments for group in cache.groups), method           # every group holds compressed tokens
        report = cache.memory_report()
        held = report["total_bytes"] + report["calibration_bytes"]           # pca: the calibration, held once
        assert held == held_storage_bytes(cache), method                       # counted = held
        # minicache keeps the tokens of random weights' diverging layer pairs: merged directions, yet few bytes saved
        assert report["ratio"] > 1 if method != "minicache" else report["factors_bytes"] > 0, method
        assert any(not path.startswith("dense") for path in cache.path_counts()), method
        caches[method] = cache
    return caches


def test_every_method_generates_on_the_tiny_llama(tiny_llama, tmp_path):
    ids = torch.randint(0, 128, (1, 192), generator=torch.Generator().manual_seed(4))
    caches = generate_with_every_method(tiny_llama, ByteTokenizer(), ids, 3, tmp_path)
    for method in ("svd", "xkv", "transform"):  # budgeted at 3× of the context, 12 decoded tokens later
        assert 2.5 < caches[method].memory_report()["ratio"] < 3.5, method


@pytest.mark.model
def test_every_method_generates_on_smollm2(smollm2, tmp_path):
    model, tok = smollm2
    ids = tok("The capital of France is Paris. The capital of Japan is Tokyo. " * 12, return_tensors="pt").input_ids
    caches = generate_with_every_method(model, tok, ids, 4, tmp_path)
    for method in ("svd", "xkv", "transform"):
        assert 2.5 < caches[method].memory_report()["ratio"] < 4.5, method


def test_every_figure_redraws_from_the_committed_results(tmp_path, capsys):
    """`python -m kvsvd figures` draws every figure from the committed CPU results alone (no model, no
    computation), with this environment's pandas and matplotlib: PNG and SVG, the caption in the figure."""
    saved = tmp_path / "results"
    shutil.copytree(Path(__file__).resolve().parents[1] / "results", saved,
                    ignore=shutil.ignore_patterns("figures", "notebooks", "interactive"))
    assert main(["figures", "--results", str(saved)]) == 0
    drawn = sorted(p.stem for p in (saved / "figures").glob("*.png"))
    assert drawn == sorted(figures.FIGURES) == sorted(p.stem for p in (saved / "figures").glob("*.svg"))
    assert "Dense" in (saved / "figures" / "04_pareto_accuracy_vs_bytes.svg").read_text()  # the caption is drawn
    assert capsys.readouterr().out.count(".png (.svg)") == len(drawn)
