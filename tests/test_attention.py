"""attn_implementation="kvsvd": attention straight from the factors, exact against the dense and
the reconstruct-on-read paths, with masks, multi-token steps and every store kind."""

import contextlib

import pytest
import torch
from transformers import DynamicCache

from kvsvd import CompressionConfig, LowRankCache
from kvsvd.attention import Factors, attend, merge
from kvsvd.compat import with_cache
from test_cache import full_rank_config, greedy

pytestmark = pytest.mark.core  # also run in the current environment


@contextlib.contextmanager
def attn(model, impl):
    previous = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def test_merge_of_parts_is_the_softmax_over_their_union():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 2, 4, 8, generator=g)            # (B, H, g, n, d)
    k, v = torch.randn(2, 3, 50, 8, generator=g), torch.randn(2, 3, 50, 8, generator=g)
    mask = torch.rand(2, 1, 1, 4, 50, generator=g) > 0.3
    mask[..., 0] = True
    ref = torch.softmax((q @ k.unsqueeze(2).mT).masked_fill(~mask, float("-inf")), -1) @ v.unsqueeze(2)
    parts = [attend(q, k[:, :, a:b], v[:, :, a:b], mask[..., a:b]) for a, b in ((0, 7), (7, 30), (30, 50))]
    torch.testing.assert_close(merge(parts), ref, atol=1e-5, rtol=1e-5)
    empty = attend(q, k[:, :, :5], v[:, :, :5], torch.zeros_like(mask[..., :5]))  # fully masked part
    torch.testing.assert_close(merge([empty, attend(q, k, v, mask)]), ref, atol=1e-5, rtol=1e-5)


def test_factor_scores_and_values_equal_the_reconstruction():
    g = torch.Generator().manual_seed(1)
    u, w = torch.randn(2, 40, 6, generator=g), torch.randn(1, 6, 3, 8, generator=g)
    mean = torch.randn(2, 3, 8, generator=g)  # one per sequence (a per-prompt transform basis)
    f = Factors(u, w, mean)
    x = (u @ w.flatten(2)).unflatten(-1, (3, 8)).transpose(1, 2) + mean[:, :, None]  # (B, H, T, d)
    q = torch.randn(2, 3, 2, 1, 8, generator=g)
    torch.testing.assert_close(f.scores(q), q @ x.unsqueeze(2).mT, atol=1e-4, rtol=1e-4)
    p = torch.rand(2, 3, 2, 1, 40, generator=g)
    torch.testing.assert_close(f.combine(p), p @ x.unsqueeze(2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokens", [48, 45, 7])  # whole blocks of 16; a partial last block; one partial block
@pytest.mark.parametrize("rows", [3, 40])       # folded into the blocks (≤ 16 rows); rebuilt (more rows than a block)
def test_coded_columns_read_as_their_dequantised_values(tokens, rows):
    """Scores and weighted sums read from integer codes, the quantiser folded in block by block, equal the
    same products over the dequantised columns; Factors over codes equal Factors over those columns."""
    from kvsvd.methods.transform import block_stats, coded_columns, quantize
    g = torch.Generator().manual_seed(3)
    c = torch.randn(2, tokens, 5, generator=g) * torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1])
    stats = block_stats(c, 16)
    parts = [coded_columns(quantize(c[..., :2], stats[..., :2, :], 4, 16), stats[..., :2, :], 4, 16),
             coded_columns(quantize(c[..., 2:], stats[..., 2:, :], 2, 16), stats[..., 2:, :], 2, 16)]
    u = torch.cat([part.dense() for part in parts], -1)
    assert (u - c).abs().max() < 1.5 * c.abs().amax((0, 1)).max()  # a coarse code of c, not something else
    a, pw = torch.randn(2, rows, 5, generator=g), torch.rand(2, rows, tokens, generator=g)
    for part, cols in zip(parts, (slice(0, 2), slice(2, 5))):
        torch.testing.assert_close(part.scores(a[..., cols]), a[..., cols] @ u[..., cols].mT, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(part.sums(pw), pw @ u[..., cols], atol=1e-4, rtol=1e-4)
    w, mean = torch.randn(1, 5, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    coded, plain = Factors(parts, w, mean), Factors(u, w, mean)
    torch.testing.assert_close(coded.token_factor(), u)
    q, p = torch.randn(2, 3, 1, 1, 8, generator=g), torch.rand(2, 3, 1, 1, tokens, generator=g)
    torch.testing.assert_close(coded.scores(q), plain.scores(q), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(coded.combine(p), plain.combine(p), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method, G", [("svd", 1), ("xkv", 2)])
@pytest.mark.parametrize("key_space", ["post_rope", "pre_rope"])
def test_full_rank_factor_path_matches_dense_attention(tiny_llama, method, G, key_space):
    ids = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(2))
    ref_seq, ref_logits = greedy(tiny_llama, ids, DynamicCache(), n=12)
    cache = LowRankCache(full_rank_config(method, G, 32, key_space, block_size=4), tiny_llama.config)
    with attn(tiny_llama, "kvsvd"):
        assert cache.decodes_from_factors
        seq, logits = greedy(tiny_llama, ids, cache, n=12)
    assert torch.equal(seq, ref_seq)
    assert (logits - ref_logits).abs().max() < 1e-4
    assert sum(len(g.segments) for g in cache.groups) >= 2  # prefill segment + decode blocks


RANKS = dict(rank_k=12, rank_v=20)
STORE_CONFIGS = [dict(method="xkv", layer_group_size=2, key_space="post_rope", **RANKS),
                 dict(method="xkv", layer_group_size=2, key_space="post_rope", factor_dtype="bf16", **RANKS),
                 dict(method="xkv", layer_group_size=2, key_space="pre_rope", factor_dtype="int8", **RANKS),
                 dict(method="svd", layer_group_size=1, key_space="post_rope", factor_dtype="int4", **RANKS),
                 dict(method="minicache", layer_group_size=2, start_layer=0),
                 dict(method="transform", layer_group_size=2, key_space="pre_rope",
                      ratio=3.0, block_tokens=16, **RANKS),
                 dict(method="transform", layer_group_size=3, key_space="post_rope",
                      ratio=4.0, block_tokens=16, **RANKS),
                 dict(method="transform", layer_group_size=2, key_space="post_rope",
                      ratio=4.0, block_tokens=16, quantiser="vector")]


@pytest.mark.parametrize("kw", STORE_CONFIGS)
def test_every_store_meets_the_protocol_and_its_latent_form_is_its_layer(tiny_llama, kw, monkeypatch):
    """Every segment's K and V store (dense sinks, low-rank factors, MiniCache merges, transform codes) has
    path, layer, latent and held; where latent gives Factors, u·w + mean is the layer it rebuilds (transform
    codes: u as coded columns, read without dequantising them, from FOLD_FROM coefficients; these stores are
    short, so it is lowered to 1)."""
    from kvsvd.methods import transform
    from kvsvd.store import Store
    monkeypatch.setattr(transform, "FOLD_FROM", 1)
    cfg = CompressionConfig.of(residual_length=4, block_size=6, **kw)
    cache = LowRankCache(cfg, tiny_llama.config)
    greedy(tiny_llama, torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(8)), cache, n=8)
    stores = [s for g in cache.groups for seg in g.segments for s in (seg.keys, seg.values)]
    assert stores and all(isinstance(s, Store) and s.path and s.held() for s in stores)
    if kw.get("quantiser") == "vector":  # a codebook's columns among them
        assert any(code.tokens > 1 for s in stores for code, _ in getattr(s, "widths", ()))
    latent = coded = 0
    for group in cache.groups:
        for seg in group.segments:
            for store in (seg.keys, seg.values):
                for j in range(len(group.layers)):
                    f = store.latent(j, 2)
                    if f is not None:
                        rebuilt = f.token_factor() @ f.w.flatten(2) + (0 if f.mean is None else f.mean.flatten(1)[:, None])
                        torch.testing.assert_close(rebuilt, store.layer(j, torch.float32), atol=1e-5, rtol=1e-5)
                        latent += 1
                        coded += not isinstance(f.u, torch.Tensor) or f.u.shape[-1] == 0
    assert (latent > 0) == (kw["method"] != "minicache")
    assert (0 < coded == latent) == (kw["method"] == "transform")


@pytest.mark.parametrize("kw", STORE_CONFIGS)
def test_low_rank_factor_path_matches_reconstruct_on_read_with_padding(tiny_llama, kw):
    """Same compressed cache, two attention paths: identical up to float rounding, batch of two
    with left padding (the mask path) and block compression during decode. The transform coder's
    values (and its post-RoPE keys) are attended from their coefficients: p·Ĉ, then the basis."""
    ids = torch.randint(3, 128, (2, 70), generator=torch.Generator().manual_seed(3))
    ids[1, :9] = 0
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    cfg = CompressionConfig.of(residual_length=4, block_size=6, **kw)
    seq, logits = greedy(tiny_llama, ids, LowRankCache(cfg, tiny_llama.config), n=10, attention_mask=mask)
    with attn(tiny_llama, "kvsvd"):
        seq2, logits2 = greedy(tiny_llama, ids, LowRankCache(cfg, tiny_llama.config), n=10, attention_mask=mask)
    assert torch.equal(seq, seq2)
    assert (logits - logits2).abs().max() < 1e-4


def test_calibrated_transform_latent_path_matches_reconstruct_and_reads_no_dense_values(tiny_llama, tmp_path,
                                                                                      monkeypatch):
    """A calibrated basis (batch 1, shared by the sequences): the same tokens on both paths, and the kvsvd
    attention never rebuilds a value matrix (only the keys, pre-RoPE, are rebuilt and rotated)."""
    from test_transform import calibrated
    from kvsvd.methods.transform import TransformStore
    _, cfg = calibrated(tiny_llama, tmp_path, 2, residual_length=4, block_size=8, block_tokens=16)
    ids = torch.randint(3, 128, (2, 60), generator=torch.Generator().manual_seed(6))
    seq, logits = greedy(tiny_llama, ids, LowRankCache(cfg, tiny_llama.config), n=10)
    rebuilt = []
    layer = TransformStore.layer
    monkeypatch.setattr(TransformStore, "layer", lambda self, j, dtype: rebuilt.append(self) or layer(self, j, dtype))
    with attn(tiny_llama, "kvsvd"):
        cache = LowRankCache(cfg, tiny_llama.config)
        seq2, logits2 = greedy(tiny_llama, ids, cache, n=10)
    assert torch.equal(seq, seq2) and (logits - logits2).abs().max() < 1e-4
    keys = {id(s.keys) for g in cache.groups for s in g.segments}
    assert rebuilt and all(id(s) in keys for s in rebuilt)


def test_multi_token_step_after_compression_is_causal(tiny_llama):
    """Feeding several tokens at once after the prefill was compressed (a question after a context)."""
    g = torch.Generator().manual_seed(4)
    ctx, question = torch.randint(0, 128, (1, 60), generator=g), torch.randint(0, 128, (1, 7), generator=g)
    cfg = CompressionConfig.of(method="xkv", layer_group_size=2, rank_k=10, rank_v=16, key_space="post_rope",
                            residual_length=4)
    outs = []
    for impl in ("sdpa", "kvsvd"):
        with attn(tiny_llama, impl), torch.no_grad():
            cache = LowRankCache(cfg, tiny_llama.config)
            tiny_llama(ctx, **with_cache(cache))
            cache.compress_pending()
            outs.append(tiny_llama(question, **with_cache(cache)).logits)
    assert (outs[0] - outs[1]).abs().max() < 1e-4


def test_other_caches_and_prefill_use_sdpa_and_dropout_is_refused(tiny_llama):
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(5))
    ref = greedy(tiny_llama, ids, DynamicCache())[1]
    with attn(tiny_llama, "kvsvd"):
        torch.testing.assert_close(greedy(tiny_llama, ids, DynamicCache())[1], ref)
    from kvsvd.attention import kvsvd_attention_forward
    cache = LowRankCache(CompressionConfig.of(method="svd", layer_group_size=1, rank_k=4, rank_v=4, residual_length=2,
                                           key_space="post_rope"),
                         tiny_llama.config)
    with attn(tiny_llama, "kvsvd"), torch.no_grad():
        tiny_llama(ids, **with_cache(cache))
        cache.compress_pending()
        k, v = cache.layers[0].update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))
        with pytest.raises(ValueError, match="dropout=0.1 is not supported"):
            kvsvd_attention_forward(tiny_llama.model.layers[0].self_attn, torch.zeros(1, 4, 1, 16), k, v, None,
                                    dropout=0.1)


@pytest.mark.model
def test_load_model_with_kvsvd_attention(smollm2):
    """attn_implementation="kvsvd" is all a user sets; a full-rank cache gives the dense answer."""
    model, tok = smollm2
    ids = tok("The quick brown fox jumps over the lazy dog. " * 12, return_tensors="pt").input_ids
    ref_seq, ref_logits = greedy(model, ids, DynamicCache())
    with attn(model, "kvsvd"):
        seq, logits = greedy(model, ids, LowRankCache(full_rank_config("xkv", 2, 192, "post_rope"), model.config))
    assert torch.equal(seq, ref_seq) and (logits - ref_logits).abs().max() < 1e-3
