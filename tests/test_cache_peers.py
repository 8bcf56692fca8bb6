"""LowRankCache with calibrated PCA, MiniCache merging, and inside kvpress's pipeline."""

import shutil

import pytest
import torch
from transformers import DynamicCache, pipeline

import kvsvd
from kvsvd import CompressionConfig, LowRankCache
from kvsvd.compat import with_cache
from kvsvd.methods import minicache
from conftest import ByteTokenizer, held_storage_bytes

CONTEXT = "The secret access code is 4417. " + "The grass is green. The sky is blue. " * 40
QUESTION = "What is the secret access code?"


@pytest.fixture(scope="module")
def calibration(smollm2, tmp_path_factory):
    model, tok = smollm2
    path = tmp_path_factory.mktemp("calib") / "smollm2.safetensors"
    return kvsvd.calibrate(model, tok, [CONTEXT, "Water boils at 100 degrees. " * 30], 192, 192, path)


@pytest.mark.model
def test_pca_at_full_rank_reproduces_the_model(smollm2, calibration):
    model, tok = smollm2
    ids = tok("Once upon a time there was a cat. " * 30, return_tensors="pt").input_ids
    assert ids.shape[1] > 192  # longer than the rank, so it is really projected
    ref = model(ids, **with_cache(DynamicCache())).logits
    cache = LowRankCache(CompressionConfig.of(method="pca", layer_group_size=1, rank_k=192, rank_v=192,
                                           calibration_path=str(calibration), residual_length=0, factor_dtype="fp32",
                                           dense_dtype="fp32"), model.config)
    model(ids[:, :-1], **with_cache(cache))
    last = model(ids[:, -1:], **with_cache(cache)).logits
    assert (last[:, -1] - ref[:, -1]).abs().max() < 1e-4
    rep = cache.memory_report()
    assert rep["calibration_bytes"] > 0 and rep["factors_bytes"] > 0


@pytest.mark.model
def test_pca_refuses_a_calibration_for_another_model_or_rank(calibration, tiny_llama, smollm2):
    with pytest.raises(ValueError, match="made for another model: .*num_hidden_layers=30 \\(model: 4\\)"):
        LowRankCache(CompressionConfig.of(method="pca", layer_group_size=1, rank_k=8, rank_v=8,
                                       calibration_path=str(calibration)), tiny_llama.config)
    with pytest.raises(FileNotFoundError, match="calibration_path"):
        LowRankCache(CompressionConfig.of(method="pca", layer_group_size=1, rank_k=8, rank_v=8,
                                       calibration_path="/nonexistent.safetensors"), smollm2[0].config)


def test_minicache_merges_identical_layers_losslessly_and_keeps_divergent_tokens():
    cfg = CompressionConfig.of(method="minicache", layer_group_size=2, gamma=0.05, factor_dtype="fp32",
                            dense_dtype="fp32")
    x = torch.randn(1, 50, 1, 32).expand(1, 50, 2, 32).clone()
    x[:, :, 1] *= 3.0                       # same directions, different norms: a perfect merge
    x[:, 7, 1] = torch.randn(32)            # one divergent token
    store = minicache.compress(x, cfg, kind="k", layers=[0, 1], heads=2)
    assert store.merged.sum() == 49 and not store.merged[0, 7]
    for j in (0, 1):
        assert torch.allclose(store.layer(j, torch.float32), x[:, :, j], atol=1e-5)


@pytest.mark.model
def test_kvpress_pipeline_with_lowrank_cache_alone_and_after_a_press(smollm2):
    from kvpress import KnormPress
    model, tok = smollm2
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    assert "4417" in pipe(CONTEXT, question=QUESTION, max_new_tokens=10)["answer"]
    cfg = CompressionConfig.of(method="svd", layer_group_size=1, rank_k=48, rank_v=64, key_space="post_rope")
    cache = LowRankCache(cfg, model.config)
    answer = pipe(CONTEXT, question=QUESTION, max_new_tokens=10, cache=cache)["answer"]
    assert "4417" in answer and cache.memory_report()["ratio"] > 2
    context_tokens = len(tok.apply_chat_template([{"role": "user", "content": CONTEXT}], tokenize=False))
    cache = LowRankCache(cfg, model.config)
    pipe(CONTEXT, question=QUESTION, max_new_tokens=10, cache=cache, press=KnormPress(compression_ratio=0.3))
    kept = cache.get_seq_length()
    assert kept < context_tokens and cache.memory_report()["ratio"] > 1.5
    with pytest.raises(ValueError, match="key_space='post_rope'"):
        pipe(CONTEXT, question=QUESTION, max_new_tokens=10, press=KnormPress(compression_ratio=0.3),
             cache=LowRankCache(CompressionConfig.of(method="svd", layer_group_size=1, rank_k=48, rank_v=64), model.config))


@pytest.mark.model
def test_kvpress_pipeline_and_generate_with_the_transform_cache(smollm2):
    """method="transform" as a drop-in cache on SmolLM2: kvpress's pipeline (cache= argument) and
    model.generate both answer from the codes, at the bytes asked for."""
    import kvpress  # noqa: F401  (registers the pipeline)
    from kvsvd.config import config_for_ratio
    model, tok = smollm2
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    n = len(tok(tok.apply_chat_template([{"role": "user", "content": CONTEXT}], tokenize=False)).input_ids)
    cfg = config_for_ratio(4, n, model.config, method="transform", layer_group_size=5, block_tokens=64)
    cache = LowRankCache(cfg, model.config)
    assert "4417" in pipe(CONTEXT, question=QUESTION, max_new_tokens=10, cache=cache)["answer"]
    assert cache.path_counts()["gram transform int8"] == 12 and cache.memory_report()["ratio"] > 3
    chat = tok.apply_chat_template([{"role": "user", "content": CONTEXT + QUESTION}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(chat, return_tensors="pt").input_ids
    cache = LowRankCache(config_for_ratio(4, ids.shape[1], model.config, method="transform", layer_group_size=5,
                                          block_tokens=64), model.config)
    out = model.generate(ids, **with_cache(cache), max_new_tokens=12, do_sample=False)
    assert "4417" in tok.decode(out[0, ids.shape[1]:]) and cache.memory_report()["ratio"] > 3


def test_pca_at_full_rank_reproduces_the_tiny_model(tiny_llama, tmp_path):
    path = kvsvd.calibrate(tiny_llama, ByteTokenizer(), ["some calibration text " * 20, "and another " * 30],
                           32, 32, tmp_path / "tiny.safetensors")
    ids = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(0))
    ref = tiny_llama(ids, **with_cache(DynamicCache())).logits[:, -1]
    cache = LowRankCache(CompressionConfig.of(method="pca", layer_group_size=1, rank_k=32, rank_v=32,
                                           calibration_path=str(path), residual_length=0, factor_dtype="fp32",
                                           dense_dtype="fp32"), tiny_llama.config)
    tiny_llama(ids[:, :-1], **with_cache(cache))
    assert (tiny_llama(ids[:, -1:], **with_cache(cache)).logits[:, -1] - ref).abs().max() < 1e-4
    assert cache.memory_report()["factors_bytes"] > 0
    small = kvsvd.calibrate(tiny_llama, ByteTokenizer(), ["text " * 40], 8, 8, tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match="rank_k=9 exceeds the calibrated rank 8"):
        LowRankCache(CompressionConfig.of(method="pca", layer_group_size=1, rank_k=9, rank_v=8,
                                       calibration_path=str(small)), tiny_llama.config)


@pytest.mark.model
@pytest.mark.parametrize("ratio", [8, 16])
@pytest.mark.parametrize("basis", ["prompt", "calibrated"])
def test_kvpress_pipeline_with_the_transform_defaults_at_8x_and_16x(smollm2, smollm2_calibration, ratio, basis):
    """config_for_ratio's defaults from 8× on (an 8-token window and blocks of 32, from 16× 4 and 16) code the
    question and the answer into blocks; the pipeline then crops them away: the coded blocks after the context
    are dropped, the one that straddles it decoded, and the cache holds the context at its ratio. At 8× the
    answer is right."""
    import kvpress  # noqa: F401  (registers the pipeline)
    from kvsvd.config import config_for_ratio
    model, tok = smollm2
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    n = len(tok(tok.apply_chat_template([{"role": "user", "content": CONTEXT}], tokenize=False)).input_ids)
    extra = {"calibration_path": str(smollm2_calibration)} if basis == "calibrated" else {"basis": "prompt"}
    cfg = config_for_ratio(ratio, n, model.config, method="transform", **extra)
    assert (cfg.residual_length, cfg.block_size, cfg.params.basis) == ((8, 32) if ratio == 8 else (4, 16)) + (basis,)
    cache = LowRankCache(cfg, model.config)
    answer = pipe(CONTEXT, question=QUESTION, max_new_tokens=10, cache=cache)["answer"]
    assert "4417" in answer or ratio == 16
    context = cache.get_seq_length()
    assert context < n and cache.ropes["full_attention"].length == context
    assert all(g.compressed_length <= context for g in cache.groups)
    assert cache.memory_report()["ratio"] == pytest.approx(ratio, rel=0.05)


@pytest.fixture(scope="module")
def prefill_2048(smollm2):
    """One recorded dense prefill of 2048 tokens of prose, replayed into each cache (``kvsvd.evaluate``)."""
    from kvsvd.bench.kernels import natural_text
    from kvsvd.evaluate import record_prefill
    model, tok = smollm2
    return record_prefill(model, tok(natural_text(16_000), return_tensors="pt").input_ids[:, :2048])


@pytest.mark.model
@pytest.mark.parametrize("named", [False, True])
def test_the_transform_defaults_hold_their_bytes_at_every_headline_ratio(smollm2, smollm2_calibration, prefill_2048,
                                                                          named, monkeypatch, tmp_path):
    """config_for_ratio(r, 2048, model.config, method="transform") with nothing else: groups of 5, the window and
    the basis of its ratio (each prompt's own below 8×, from 8× the calibration in the model's default file; a
    32-token window below 8×, 8 from 8×, 4 from 16×), the
    bytes asked for, every byte counted, no RoPE bytes (contiguous positions), the calibration beside the ratio;
    ``named``: the other basis, named, at every ratio."""
    from kvsvd.calibrate import default_path
    from kvsvd.config import config_for_ratio
    from kvsvd.evaluate import replay_prefill
    model, _ = smollm2
    monkeypatch.setenv("KVSVD_MODEL_CACHE", str(tmp_path))
    default = default_path(model.config, 5)
    default.parent.mkdir(parents=True)
    shutil.copy(smollm2_calibration, default)
    for ratio in (2, 2.7, 4, 8, 16):
        basis = "calibrated" if (ratio >= 8) != named else "prompt"
        cfg = config_for_ratio(ratio, 2048, model.config, method="transform", **({"basis": basis} if named else {}))
        assert cfg.layer_group_size == 5 and cfg.params.basis == basis
        assert cfg.params.calibration_path == (str(default) if basis == "calibrated" else None)
        assert (cfg.residual_length, cfg.block_size) == ((4, 16) if ratio >= 16 else (8, 32) if ratio >= 8 else (32, 512))
        cache = LowRankCache(cfg, model.config)
        with torch.no_grad():
            replay_prefill(model, prefill_2048, cache)
        cache.compress_pending()
        rep = cache.memory_report()
        assert rep["ratio"] == pytest.approx(ratio, rel=0.02), ratio
        assert rep["total_bytes"] + rep["calibration_bytes"] == held_storage_bytes(cache)
        assert rep["rope_bytes"] == 0 and (rep["calibration_bytes"] > 0) == (basis == "calibrated")
