"""The transform-coded cache: bit packing, the quantiser, the allocator, bytes held, generate."""

import copy
from dataclasses import replace
import json

import pytest
import torch
from transformers import DynamicCache

from kvsvd import CompressionConfig, LowRankCache
from kvsvd.compat import with_cache
from kvsvd.config import config_for_ratio
from kvsvd.gridspec import label
from kvsvd.methods import transform
from kvsvd import codebook
from kvsvd.methods.transform import CODES, GAUSS_MSE, GAUSS_STEP, MEANS, TransformConfig, pack_bits, unpack_bits
from conftest import ByteTokenizer, held_storage_bytes
import kvsvd
from kvsvd.calibrate import Calibration, default_path
from transformers import LlamaConfig

pytestmark = pytest.mark.core  # also run in the current environment


def prefilled(model, cfg, tokens=200, seed=0, batch=1):
    ids = torch.randint(0, 128, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    cache = LowRankCache(cfg, model.config)
    dyn = DynamicCache()
    with torch.no_grad():
        model(ids, **with_cache(cache))
        model(ids, **with_cache(dyn))
    cache.compress_pending()
    return cache, dyn


def test_gaussian_steps_are_the_mse_optimal_uniform_steps():
    """GAUSS_STEP re-derived: the step minimising a unit Gaussian's midrise quantiser MSE, by integration."""
    x = torch.linspace(-12, 12, 400_001, dtype=torch.float64)
    pdf = torch.exp(-x**2 / 2) / (2 * torch.pi) ** 0.5 * (x[1] - x[0])

    def mse(step, bits):
        half = 1 << (bits - 1)
        q = torch.floor(x / step).clamp(-half, half - 1)
        return float(((x - (q + 0.5) * step) ** 2 * pdf).sum())

    for bits, step in GAUSS_STEP.items():
        assert mse(step, bits) <= min(mse(step * 0.99, bits), mse(step * 1.01, bits))


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trips_and_holds_n_bits_per_value(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (2, 1001), generator=g, dtype=torch.uint8)
    packed = pack_bits(q, bits)
    planes = {1: [1], 2: [2], 3: [2, 1], 4: [4], 5: [4, 1], 6: [4, 2], 7: [4, 2, 1], 8: [8]}[bits]
    assert packed.dtype == torch.uint8 and packed.shape == (2, sum(-(-1001 * b // 8) for b in planes))
    assert torch.equal(unpack_bits(packed, bits, 1001), q)
    padded = torch.randint(0, 1 << bits, (2, 1024), generator=g, dtype=torch.uint8)[:, :1001]
    assert pack_bits(padded, bits).untyped_storage().nbytes() == packed.numel()  # no padding stays held


def test_bit_width_outside_the_set_is_refused():
    with pytest.raises(ValueError, match="bits=9 is not a code width; accepted: 1 to 8"):
        pack_bits(torch.zeros(1, 8, dtype=torch.uint8), 9)


@pytest.mark.parametrize("scale", transform.BLOCK_SCALES)
@pytest.mark.parametrize("bits", range(1, 9))
def test_block_quantiser_error_is_the_gaussian_rate_distortion_of_its_step(bits, scale):
    """On Gaussian columns the measured MSE is Max's: 0.3634, 0.1188, 0.0374, 0.0115 σ² ... (±8%); at 8 bits
    the granular Δ²/12 (the ±3.9σ overload is next to never reached in 4096 samples, so an unclipped
    scale is σ on nearly every block)."""
    expected = {1: 0.3634, 2: 0.1188, 3: 0.03744, 4: 0.01154, 5: 0.003495, 6: 0.001040, 7: 0.0003043,
                8: GAUSS_STEP[8] ** 2 / 12}[bits]
    c = torch.randn(1, 4096, 8, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 9).float() + 3.0
    stats = transform.block_stats(c, 512, scale)
    rec = transform.dequantize(transform.quantize(c, stats, bits, 512), stats, bits, 512)
    mse = (c - rec).square().mean(1) / c.var(1)
    assert mse.mean().item() == pytest.approx(expected, rel=0.08)


def test_the_shipped_codebooks_beat_the_scalar_quantiser_at_every_rate():
    """Each codebook's recorded MSE holds on fresh N(0, 1) points (±2%), and is below what the scalar
    quantiser reaches at the same bits per entry: Max's MSE at 1 and 2 bits, and below 1 bit its best mix of
    0 and 1 bit per column (time sharing: 1 − rate·(1 − 0.3634))."""
    for bits, (tokens, index_bits) in codebook.VECTOR_CODES.items():
        book = codebook.codebook(tokens, index_bits)
        assert book.shape == (1 << index_bits, tokens) and index_bits == bits * tokens
        recorded = codebook.held_out_mse(tokens, index_bits)
        assert codebook.mse(book, seed=99) == pytest.approx(recorded, rel=0.02)
        lo, hi = int(bits), int(bits) + 1
        scalar = GAUSS_MSE[bits] if bits in (1, 2) else (hi - bits) * GAUSS_MSE.get(lo, 1.0) + (bits - lo) * GAUSS_MSE[hi]
        assert recorded < scalar


def test_lloyd_on_a_2d_gaussian_with_4_points_finds_the_product_of_two_1_bit_quantisers():
    """The optimum is a square of side 2·√(2/π) centred on 0, in any rotation (the Gaussian is isotropic)."""
    book, mse = codebook.train(2, 2, samples=1 << 15, iterations=30)
    side = 2 * (2 / torch.pi) ** 0.5
    assert book.norm(dim=1).tolist() == pytest.approx([side / 2 ** 0.5] * 4, abs=0.1)  # a flat optimum
    assert sorted(torch.pdist(book).tolist()) == pytest.approx([side] * 4 + [side * 2 ** 0.5] * 2, abs=0.15)
    assert mse == pytest.approx(GAUSS_MSE[1], rel=0.02)


@pytest.mark.parametrize("code", [c for c in CODES["vector"] if c.tokens > 1], ids=lambda c: f"{c.bits:g}")
def test_vector_codes_reach_their_codebooks_error_on_gaussian_columns_and_read_back_as_coded_columns(code):
    """Columns of different scale and offset, 1001 tokens (the last run padded), blocks of 256: the error per
    σ² is the codebook's (±8%); the coded columns read back equal the codebook's points laid token by token;
    a constant column comes back exact; the packed codes hold ⌈T/tokens⌉ indices of index_bits each."""
    T = 1001
    c = torch.randn(1, T, 8, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 9).float() + 3.0
    c[..., 0] = 2.5
    stats = transform.block_stats(c, 256, "std")
    q = code.quantize(c, stats, 256)
    assert q.shape == (1, -(-T // code.tokens), 8) and int(q.max()) < 1 << code.index_bits
    cols = code.columns(q, stats, 256, T)
    rec = cols.dense()
    mse = (c - rec)[..., 1:].square().mean(1) / c[..., 1:].var(1)
    assert mse.mean().item() == pytest.approx(code.mse(), rel=0.08)
    assert torch.equal(rec[..., 0], c[..., 0])
    book = codebook.codebook(code.tokens, code.index_bits)
    assert torch.equal(cols.q[0, :code.tokens, 3], book[q[0, 0, 3].long()])
    packed = pack_bits(q.reshape(1, -1), code.index_bits)
    assert packed.numel() == pytest.approx(code.nbytes(T) * 8, abs=1)


def test_an_unclipped_block_scale_keeps_a_needle_token_that_a_sigma_scale_clips():
    """One token of a 256-token Gaussian block sits 20σ out (a needle unlike its haystack). A σ-scaled
    8-bit code clips it at ±3.9 block σ (an error over 10σ); the unclipped scale reaches it (within two
    steps) and keeps the rest of the block within 30× of the Gaussian 8-bit error."""
    g = torch.Generator().manual_seed(0)
    c = torch.randn(1, 256, 4, generator=g)
    c[0, 100, 2] = 20.0
    errors = {}
    for scale in transform.BLOCK_SCALES:
        stats = transform.block_stats(c, 256, scale)
        rec = transform.dequantize(transform.quantize(c, stats, 8, 256), stats, 8, 256)
        step = GAUSS_STEP[8] * stats[0, 0, 2, 0].float()
        errors[scale] = ((rec - c)[0, 100, 2].abs().item(), step.item(), (rec - c)[0, :, 2].square().mean().item())
    assert errors["std"][0] > 10.0  # clipped at ±3.9 of the block σ, which the needle itself raises to 1.6
    needle, step, mse = errors["unclipped"]
    assert needle <= 2 * step and mse < 30 * GAUSS_STEP[8] ** 2 / 12
    assert torch.equal(transform.block_stats(c[..., :2], 256, "unclipped"), transform.block_stats(c[..., :2], 256, "std"))


def test_allocator_gives_more_bits_to_more_variance_and_fits_the_budget():
    """Two matrices with decaying spectra: bits never increase down a spectrum, the larger matrix gets
    more, the bytes spent fit the budget, and a budget below the means is refused."""
    cfg = CompressionConfig(method="transform", layer_group_size=1, params=TransformConfig(ratio=4, block_tokens=64))
    g = torch.Generator().manual_seed(0)
    spectra = torch.logspace(0, -2, 32)
    xs = [(torch.randn(1, 256, 32, generator=g) * spectra) @ torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
          for _ in range(2)]
    latents = [transform.analyse((s * x).unsqueeze(2), 32, cfg, kind="k", layers=[i])
               for i, (s, x) in enumerate(zip((1.0, 10.0), xs))]
    budget = 2 * 256 * 32 * 2 / 4
    choices, lam = transform.allocate(latents, budget, cfg)
    widths = torch.tensor([code.bits for code in CODES["scalar"]])
    bits = [widths[ch] for ch in choices]
    for b in bits:
        assert (b[1:] <= b[:-1]).all()
    assert bits[1].sum() > bits[0].sum()
    spent = sum(lt.cost.gather(1, ch[:, None]).sum() + lt.mean.numel() * 2 for lt, ch in zip(latents, choices))
    assert spent <= budget and spent > 0.9 * budget
    with pytest.raises(ValueError, match="ratio leaves 100 bytes"):
        transform.allocate(latents, 100, cfg)
    heavier = CompressionConfig(method="transform", layer_group_size=1,
                                params=TransformConfig(ratio=4, block_tokens=64, value_weight=8.0))
    latents[1].kind = "v"  # the same budget moves to the value matrix when its error weighs more
    plain, _ = transform.allocate(latents, budget, cfg)
    weighted, _ = transform.allocate(latents, budget, heavier)
    assert widths[weighted[1]].sum() > widths[plain[1]].sum()


def test_transform_config_rejects_bad_settings(tiny_llama):
    for kwargs, pattern in (({"ratio": 1}, "ratio=1 is out of range; accepted: a number > 1"),
                            ({"basis_dtype": "fp8"}, "basis_dtype='fp8' is unknown; accepted: bf16, int8, int4"),
                            ({"sink_tokens": -1}, "sink_tokens=-1 is out of range"),
                            ({"block_tokens": 0}, "block_tokens=0 is out of range"),
                            ({"value_weight": 0}, "value_weight=0 is out of range; accepted: a number > 0"),
                            ({"block_scale": "max"}, "block_scale='max' is unknown; accepted: unclipped, std"),
                            ({"basis": "pca"}, "basis='pca' is unknown; accepted: prompt, calibrated")):
        with pytest.raises(ValueError, match=pattern):
            TransformConfig(**kwargs)
    with pytest.raises(ValueError, match=r"params=TransformConfig\(.*\) does not fit method='xkv'; accepted: a "
                                         "LowRankParams"):
        CompressionConfig(method="xkv", params=TransformConfig())
    with pytest.raises(ValueError, match="ratio=4 does not apply to method='xkv'; it takes: "):
        CompressionConfig.of(method="xkv", ratio=4)
    assert CompressionConfig(method="transform").params == TransformConfig()
    flat = config_for_ratio(4, 200, tiny_llama.config, method="transform", layer_group_size=2).to_dict()
    assert CompressionConfig.of(**flat).to_dict() == flat  # flat fields round-trip


@pytest.mark.parametrize("kwargs, pattern", [
    ({"layer_group_size": 0}, r"layer_group_size=0 is out of range; accepted: an int in \[1, 4\]"),
    ({"layer_group_size": 5}, r"layer_group_size=5 is out of range; accepted: an int in \[1, 4\]"),
    ({"method": "transfrom"}, r"method='transfrom' is unknown; accepted: svd, xkv, minicache, pca, transform"),
    ({"method": "minicache"}, r"method='minicache' has no ranks that a ratio could size"),
])
def test_config_for_ratio_names_a_bad_group_size_or_method(tiny_llama, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        config_for_ratio(4, 200, tiny_llama.config, **{"method": "transform", **kwargs})


def test_config_for_ratio_refuses_a_budget_the_dense_parts_fill(tiny_llama):
    with pytest.raises(ValueError, match=r"ratio=30 is out of reach at 200 tokens: .* accepted: ratio < "):
        config_for_ratio(30, 200, tiny_llama.config, method="transform", layer_group_size=2)
    cfg = config_for_ratio(3, 200, tiny_llama.config, method="transform", layer_group_size=2, sink_tokens=2,
                           basis_dtype="bf16", residual_length=8)
    assert cfg.params == TransformConfig(ratio=3, basis_dtype="bf16", sink_tokens=2)
    assert cfg.residual_length == 8  # rank_k / rank_v None: the basis may use all 64 columns of a group


@pytest.mark.parametrize("basis_dtype, batch, quantiser", [("int8", 1, "scalar"), ("bf16", 2, "scalar"),
                                                            ("int4", 1, "scalar"), ("int8", 2, "vector")])
def test_the_cache_holds_what_it_reports_at_the_ratio_asked(tiny_llama, basis_dtype, batch, quantiser):
    """Right after the prefill is coded: every byte counted (an independent walk over the cache finds the
    same total), the ratio the one asked for (±3%), sinks exact, one allocation over every matrix."""
    cfg = config_for_ratio(3, 200, tiny_llama.config, method="transform", layer_group_size=2, residual_length=8,
                           sink_tokens=4, block_tokens=64, basis_dtype=basis_dtype, quantiser=quantiser)
    cache, dyn = prefilled(tiny_llama, cfg, batch=batch)
    rep = cache.memory_report()
    assert rep["total_bytes"] == held_storage_bytes(cache)
    assert rep["ratio"] == pytest.approx(3, rel=0.03)
    assert rep["codes_bytes"] > 0 and rep["scales_bytes"] > 0 and rep["factors_bytes"] > 0
    assert cache.path_counts() == {"dense bf16": 4, f"gram transform {basis_dtype}": 4}
    (log,) = cache.compression_log
    assert log["layers"] == [0, 1, 2, 3] and len(log["allocation"]) == 4 and log["budget_bytes"] > 0
    for a in log["allocation"]:
        assert sum(a["bits"].values()) == 64 and 0 < a["kept"] < 64
        assert list(a["bits"]) == [f"{code.bits:g}" for code in CODES[quantiser]]
    if quantiser == "vector":  # codebook widths taken (below 3 bits per entry, every one a codebook's)
        assert sum(a["bits"][w] for a in log["allocation"] for w in ("0.25", "0.5", "0.75", "1", "1.5", "2")) > 0
        assert 0 < a["measured_error"] < 1 and 0 < a["predicted_error"] < 1
    for layer, ref in zip(cache.layers, dyn.layers):  # sinks: V as bf16 holds it, K un-rotated, held, re-rotated
        assert torch.equal(layer.values[..., :4, :], ref.values[..., :4, :].to(torch.bfloat16).float())
        assert torch.allclose(layer.keys[..., :4, :], ref.keys[..., :4, :], rtol=1e-2, atol=1e-2)
        err = (layer.values - ref.values).square().sum() / ref.values.square().sum()
        assert err < 0.5


@pytest.mark.parametrize("method, extra", [("xkv", {}), ("transform", {"block_tokens": 64})])
@torch.no_grad()
def test_reserved_tokens_land_the_ratio_at_the_end_of_the_timeline(tiny_llama, method, extra):
    """20 tokens appended after compression (a question and its answer): without a reserve the cache ends
    below the ratio asked, with reserve_tokens=20 at it."""
    ids = torch.randint(0, 128, (1, 220), generator=torch.Generator().manual_seed(4))
    ratios = []
    for reserve in (0, 20):
        cfg = config_for_ratio(3, 200, tiny_llama.config, method=method, layer_group_size=2, residual_length=8,
                               reserve_tokens=reserve, **extra)
        cache = LowRankCache(cfg, tiny_llama.config)
        tiny_llama(ids[:, :200], **with_cache(cache))
        cache.compress_pending()
        tiny_llama(ids[:, 200:], **with_cache(cache), position_ids=torch.arange(200, 220)[None])
        ratios.append(cache.memory_report()["ratio"])
    assert ratios[0] < 0.95 * 3 and ratios[1] == pytest.approx(3, rel=0.05)


def test_generous_budget_is_close_to_lossless_and_tight_one_is_not(tiny_llama):
    errors = {}
    for ratio in (1.2, 4):
        cfg = config_for_ratio(ratio, 200, tiny_llama.config, method="transform", layer_group_size=2,
                               residual_length=8, block_tokens=64)
        cache, dyn = prefilled(tiny_llama, cfg, seed=1)
        errors[ratio] = max(float((layer.values - ref.values).square().sum() / ref.values.square().sum())
                            for layer, ref in zip(cache.layers, dyn.layers))
    assert errors[1.2] < 1e-3 < errors[4]


def test_generate_decodes_from_the_codes_and_codes_new_blocks(tiny_llama):
    """Decode reads the codes (no rebuilt copy outlives a step), later blocks are coded at the same
    ratio of their own bytes on the prefill's basis, and memoized reads give the same tokens."""
    ids = torch.randint(0, 128, (1, 160), generator=torch.Generator().manual_seed(2))
    cfg = config_for_ratio(3, 160, tiny_llama.config, method="transform", layer_group_size=2, residual_length=4,
                           block_size=16, block_tokens=32)
    seqs = []
    for memo in (False, True):
        cache = LowRankCache(cfg, tiny_llama.config, memoize_reads=memo)
        out = tiny_llama.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, **with_cache(cache),
                                  pad_token_id=0, attention_mask=torch.ones_like(ids))
        seqs.append(out)
        assert len(cache.compression_log) >= 2 and len(cache.groups[0].segments) >= 3
        rep = cache.memory_report()
        assert rep["total_bytes"] == held_storage_bytes(cache) - rep["rebuilt_bytes"]
        assert (rep["rebuilt_bytes"] > 0) == memo
        block, last = cache.compression_log[1], cache.groups[0].segments[-1]
        assert last.length == 16 and last.keys.codes
        coded = cache.groups[0].segments[1]  # the prefill's coded segment, after the sinks
        assert last.keys.basis is coded.keys.basis and last.values.mean is coded.values.mean  # one basis, held once
        assert last.keys.rows.dtype == torch.int16 and rep["index_bytes"] > 0
        assert cache.path_counts()["shared basis transform int8"] == 2 * (len(cache.groups[0].segments) - 2) * 2
        assert block["budget_bytes"] == pytest.approx(2 * 16 * 64 * 2 / 3)  # K+V × 16 tokens × G·F × 16 bits / 3
    assert torch.equal(seqs[0], seqs[1])


@pytest.mark.parametrize("quantiser", transform.QUANTISERS)
def test_kvsvd_attention_decodes_transform_segments(tiny_llama, quantiser):
    """attn_implementation="kvsvd" reads each segment per layer: the same tokens as the model's own attention."""
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(3))
    cfg = config_for_ratio(2.5, 120, tiny_llama.config, method="transform", layer_group_size=2, residual_length=4,
                           block_tokens=32, quantiser=quantiser)
    model = copy.deepcopy(tiny_llama)
    outs = []
    for impl in ("sdpa", "kvsvd"):
        model.set_attn_implementation(impl)
        outs.append(model.generate(ids, max_new_tokens=8, do_sample=False, **with_cache(LowRankCache(cfg, model.config)),
                                   pad_token_id=0, attention_mask=torch.ones_like(ids)))
    assert torch.equal(outs[0], outs[1])


def test_grid_label_says_what_was_asked():
    spec = {"method": "transform", "layer_group_size": 5, "ratio": 4, "basis_dtype": "int8", "sink_tokens": 4,
            "residual_length": 32}
    assert label(spec) == "transform G5 4x pre_rope basis int8 sinks 4 window 32 q2"
    assert label({**spec, "value_weight": 4.0}) == "transform G5 4x pre_rope basis int8 sinks 4 window 32 V weight 4 q2"
    assert label({**spec, "basis": "calibrated"}) == "transform G5 4x pre_rope calibrated basis int8 sinks 4 window 32"
    assert label({**spec, "basis": "calibrated", "mean": "prompt"}) == \
        "transform G5 4x pre_rope calibrated basis int8 sinks 4 window 32 prompt mean"
    assert label({**spec, "mean": "prompt"}) == label(spec)  # a prompt's own basis comes with its own mean
    # output weighting reads the calibration file, whose basis the entry then runs unless it names its own
    assert label({**spec, "weighting": "output"}) == \
        "transform G5 4x pre_rope calibrated basis int8 sinks 4 window 32 output-weighted"
    assert label({**spec, "weighting": "output", "basis": "prompt"}) == \
        "transform G5 4x pre_rope basis int8 sinks 4 window 32 output-weighted q2"
    assert label({**spec, "rope_tables": True}) == \
        "transform G5 4x pre_rope basis int8 sinks 4 window 32 cos/sin tables q2"
    # config_for_ratio's window, block size and basis at 8x, unless the entry names its own
    default8 = {"method": "transform", "ratio": 8}
    assert label(default8) == "transform G5 8x pre_rope calibrated basis int8 sinks 4 window 8 new blocks 32"
    assert label({**default8, "residual_length": 32, "block_size": 512, "basis": "prompt"}) == \
        "transform G5 8x pre_rope basis int8 sinks 4 window 32 q2"
    # a row's label reads the window its config resolved (the default depends on the model and context)
    default4 = {"method": "transform", "ratio": 4, "basis": "prompt"}
    assert label(default4) == "transform G5 4x pre_rope basis int8 sinks 4 window 32 q2"
    assert label(default4, {"residual_length": 8, "block_size": 32, "rank_k": 7}) == \
        "transform G5 4x pre_rope basis int8 sinks 4 window 8 new blocks 32 q2"


def test_the_default_window_is_small_where_the_large_ones_dense_parts_would_fill_the_budget(tiny_llama, tiny_gemma3):
    """Below 8x the defaults keep a 32-token window and new blocks of 512, unless those dense parts (sinks, window,
    reserved tokens) would hold more than DENSE_SHARE of the budget: then an 8-token window and new blocks of 32,
    as from 8x; from 16x a 4-token window and new blocks of 16. A window the caller names is kept."""
    from kvsvd.accounting import dense16_bytes
    from kvsvd.budget import dense_bytes
    from kvsvd.methods.transform import DENSE_SHARE, LARGE_WINDOW, SMALL_WINDOW, TINY_WINDOW

    def share(model_config, tokens, reserve, ratio):  # the large window's dense parts against the budget
        layers = list(range(model_config.num_hidden_layers))
        return dense_bytes(model_config, tokens + reserve, layers, 32 + 4 + reserve, "bf16") / \
            (dense16_bytes(model_config, tokens + reserve) / ratio)

    window = lambda c: {"residual_length": c.residual_length, "block_size": c.block_size}  # noqa: E731
    # the hybrid model: its sliding layers hold at most 16 tokens, so a 32-token window is most of a 4x budget
    assert share(tiny_gemma3.config, 400, 20, 4) > DENSE_SHARE
    assert window(config_for_ratio(4, 400, tiny_gemma3.config, method="transform", reserve_tokens=20)) == SMALL_WINDOW
    named = config_for_ratio(4, 400, tiny_gemma3.config, method="transform", reserve_tokens=20, residual_length=12)
    assert window(named) == {**SMALL_WINDOW, "residual_length": 12}
    # the dense model (512 positions): the large window is a small share of a 2x or 2.7x budget at 500 tokens, too
    # large a share at 4x; from 8x (the low rate) the small window whatever its share, from 16x the tiny one
    assert share(tiny_llama.config, 500, 20, 2.7) < DENSE_SHARE < share(tiny_llama.config, 500, 20, 4)
    for ratio, expect in ((2, LARGE_WINDOW), (2.7, LARGE_WINDOW), (4, SMALL_WINDOW), (8, SMALL_WINDOW),
                          (16, TINY_WINDOW)):
        cfg = config_for_ratio(ratio, 500, tiny_llama.config, method="transform", layer_group_size=2, reserve_tokens=20,
                               basis="prompt")
        assert window(cfg) == expect


@pytest.mark.parametrize("memoize", [False, True])
def test_crop_below_the_coded_length_drops_later_blocks_and_decodes_the_one_it_cuts(tiny_llama, memoize):
    """A prefill coded in one segment and 40 decoded tokens coded in blocks of 16 on its basis: cropping
    into the second block keeps the first block's codes, decodes the cut block's first tokens into the
    dense residual (the same K/V the cache gave before, to bf16), drops what follows, cuts the RoPE table,
    and counts the bytes left; decoding then goes on from the cut. A crop into the prefill's segment
    decodes that segment's head the same way."""
    cfg = config_for_ratio(3, 200, tiny_llama.config, method="transform", layer_group_size=2, residual_length=8,
                           block_size=16, block_tokens=64)
    cache, _ = prefilled(tiny_llama, cfg)
    cache.memoize_reads = memoize
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(40):
            tiny_llama(torch.randint(0, 128, (1, 1), generator=g), **with_cache(cache))
    group = cache.groups[0]
    assert [s.length for s in group.segments] == [4, 188, 16, 16] and cache.get_seq_length() == 240
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    held = cache.memory_report()["total_bytes"]
    cache.crop(-(240 - 215))  # into the second decoded block: [208, 224)
    assert [s.length for s in group.segments] == [4, 188, 16] and cache.ropes["full_attention"].length == 215
    for layer, (k, v) in zip(cache.layers, before):
        assert layer.get_seq_length() == 215 and layer.residual_length() == 7
        assert torch.equal(layer.keys[..., :208, :], k[..., :208, :])
        assert torch.allclose(layer.keys, k[..., :215, :], atol=0.02) and torch.allclose(layer.values, v[..., :215, :],
                                                                                        atol=0.02)
    rep = cache.memory_report()  # memoized reads are reachable too, counted apart from what is held
    assert rep["total_bytes"] + rep["rebuilt_bytes"] == held_storage_bytes(cache) and rep["total_bytes"] < held
    with torch.no_grad():
        tiny_llama(torch.randint(0, 128, (1, 30), generator=g), **with_cache(cache))
    assert cache.get_seq_length() == cache.ropes["full_attention"].length == 245
    cache.crop(100)  # into the prefill's coded segment [4, 192)
    assert [s.length for s in group.segments] == [4] and cache.layers[0].residual_length() == 96
    assert torch.allclose(cache.layers[0].values, before[0][1][..., :100, :], atol=0.02)
    rep = cache.memory_report()
    assert rep["total_bytes"] + rep["rebuilt_bytes"] == held_storage_bytes(cache)
    with pytest.raises(ValueError, match=r"max_length=-101 is out of range; accepted: \[-100, ∞\)"):
        cache.crop(-101)


def test_a_group_size_that_does_not_divide_the_layers_codes_the_remainder_as_a_smaller_group(tiny_llama):
    """4 layers in groups of 3: layers 0–2 form one group and layer 3 a group of its own; no layer stays
    dense, the cache holds what it reports at the ratio asked, and decoding goes on. Rank-budgeted
    methods still need whole groups."""
    cfg = config_for_ratio(3, 200, tiny_llama.config, method="transform", layer_group_size=3, residual_length=8,
                           block_tokens=64)
    assert cfg.start_layer == 0
    cache, _ = prefilled(tiny_llama, cfg)
    assert [g.layers for g in cache.groups] == [[0, 1, 2], [3]]
    assert cache.path_counts() == {"dense bf16": 4, "gram transform int8": 4}  # sinks and transform, K and V
    rep = cache.memory_report()
    assert rep["total_bytes"] == held_storage_bytes(cache)
    assert all(type(layer).__name__ == "LowRankLayer" for layer in cache.layers)  # no layer left dense
    assert rep["ratio"] == pytest.approx(3, rel=0.03)
    with torch.no_grad():
        tiny_llama(torch.randint(0, 128, (1, 3)), **with_cache(cache))
    assert cache.get_seq_length() == 203
    with pytest.raises(ValueError, match="layer_group_size=3 does not divide the 4 full-attention layers"):
        LowRankCache(CompressionConfig.of(method="xkv", layer_group_size=3, rank_k=8, rank_v=8), tiny_llama.config)


CALIBRATION_TEXTS = ["some calibration text, " * 30, "and another one. " * 40]


def calibrated(model, tmp_path, G, **fields):
    """A calibration of the tiny model in groups of G, and a transform config on it."""
    path = kvsvd.calibrate(model, ByteTokenizer(), CALIBRATION_TEXTS, None, None, tmp_path / f"G{G}.safetensors",
                           layer_group_size=G)
    fields = {"ratio": 3, "residual_length": 8, "block_tokens": 64, **fields}
    return path, config_for_ratio(fields.pop("ratio"), 200, model.config, method="transform", layer_group_size=G,
                                  basis="calibrated", calibration_path=str(path), **fields)


def test_from_8x_the_default_basis_is_the_models_calibration_in_its_default_file(tiny_llama, tmp_path, monkeypatch):
    """Below 8× each prompt's own basis; from 8× (or with output weighting) the calibrated one, read from
    ``kvsvd.calibrate.default_path``; a missing file is refused before anything runs, naming the command."""
    monkeypatch.setenv("KVSVD_MODEL_CACHE", str(tmp_path))
    for_ratio = lambda ratio, **kw: config_for_ratio(ratio, 800, tiny_llama.config, method="transform",  # noqa: E731
                                                     layer_group_size=2, **kw).params
    assert (for_ratio(4).basis, for_ratio(4).calibration_path) == ("prompt", None)
    assert (for_ratio(8, basis="prompt").basis, for_ratio(16, basis="prompt").calibration_path) == ("prompt", None)
    assert for_ratio(8, key_space="post_rope").basis == "prompt"  # a calibration holds pre-RoPE keys
    with pytest.raises(FileNotFoundError, match="the default basis from 8x is the calibrated one.*--layer-group-size 2"):
        for_ratio(8)
    with pytest.raises(FileNotFoundError, match="weighting='output' reads the model's calibration"):
        for_ratio(4, basis="prompt", weighting="output")
    path = kvsvd.calibrate(tiny_llama, ByteTokenizer(), CALIBRATION_TEXTS, None, None,
                           default_path(tiny_llama.config, 2), layer_group_size=2)
    for ratio in (8, 16):
        assert (for_ratio(ratio).basis, for_ratio(ratio).calibration_path) == ("calibrated", str(path))
    assert for_ratio(4, basis="prompt", weighting="output").calibration_path == str(path)
    cache, _ = prefilled(tiny_llama, config_for_ratio(8, 200, tiny_llama.config, method="transform",
                                                      layer_group_size=2, residual_length=8, block_tokens=64))
    assert cache.memory_report()["calibration_bytes"] > 0


@pytest.mark.parametrize("batch", [1, 2])
def test_a_calibrated_basis_is_held_once_per_model_and_reported_beside_the_ratio(tiny_llama, tmp_path, batch):
    """Groups of 3 over 4 layers (a last group of 1): the prompt holds codes, block statistics and an int16
    index of its kept columns, no basis and no mean; the calibration (int8 rows, bf16 row scales and mean per
    group and kind) is counted once, beside the ratio, and ``ratio_all_in`` charges it to this sequence."""
    path, cfg = calibrated(tiny_llama, tmp_path, 3)
    cache, dyn = prefilled(tiny_llama, cfg, batch=batch)
    rep = cache.memory_report()
    assert rep["ratio"] == pytest.approx(3, rel=0.03) and rep["factors_bytes"] == 0
    assert rep["total_bytes"] + rep["calibration_bytes"] == held_storage_bytes(cache)
    assert rep["calibration_bytes"] == 2 * sum(n * n + 2 * n + 2 * n for n in (3 * 32, 1 * 32))
    assert rep["ratio_all_in"] == pytest.approx(rep["dense16_bytes"] / (rep["total_bytes"] + rep["calibration_bytes"]))
    (log,) = cache.compression_log
    assert rep["index_bytes"] == 2 * sum(a["kept"] for a in log["allocation"])
    assert cache.path_counts() == {"dense bf16": 4, "calibrated basis transform int8": 4}
    assert "small_svd_fp32" not in log["breakdown_ms"]  # no SVD runs
    meta = Calibration.load(path, tiny_llama.config, 1, 1).meta
    assert meta["groups"] == [[0, 1, 2], [3]] and meta["kvsvd_version"] == kvsvd.__version__
    for layer, ref in zip(cache.layers, dyn.layers):
        assert float((layer.values - ref.values).square().sum() / ref.values.square().sum()) < 0.5


def test_a_calibrated_basis_at_a_generous_budget_is_close_to_lossless_and_codes_later_blocks_on_it(tiny_llama,
                                                                                                   tmp_path):
    _, cfg = calibrated(tiny_llama, tmp_path, 2, ratio=1.2)
    cache, dyn = prefilled(tiny_llama, cfg, seed=1)
    assert max(float((layer.values - ref.values).square().sum() / ref.values.square().sum())
               for layer, ref in zip(cache.layers, dyn.layers)) < 1e-3
    _, cfg = calibrated(tiny_llama, tmp_path, 2, residual_length=4, block_size=16, block_tokens=32)
    cache = LowRankCache(cfg, tiny_llama.config)
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    tiny_llama.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, **with_cache(cache), pad_token_id=0,
                        attention_mask=torch.ones_like(ids))
    last = cache.groups[0].segments[-1]
    assert last.length == 16 and last.keys.basis is cache.calibration.stores[0, "k"].basis
    assert cache.path_counts()["calibrated basis transform int8"] == 2 * 2 * (len(cache.groups[0].segments) - 1)


def test_a_calibrated_basis_with_the_prompts_own_mean_holds_that_mean_and_its_later_blocks_share_it(tiny_llama,
                                                                                                   tmp_path):
    """``mean="prompt"``: the prefill's store of each group and kind holds its own bf16 mean (counted as factors),
    at no other cost than those bytes; later blocks are coded on the calibrated basis around that same mean."""
    path, cfg = calibrated(tiny_llama, tmp_path, 2, mean="prompt")
    own, _ = prefilled(tiny_llama, cfg)
    theirs, _ = prefilled(tiny_llama, replace(cfg, params=replace(cfg.params, mean="basis")))
    rep = own.memory_report()
    assert rep["factors_bytes"] == 2 * 2 * (2 * 32) * 2 and theirs.memory_report()["factors_bytes"] == 0  # 2 groups
    assert rep["total_bytes"] + rep["calibration_bytes"] == held_storage_bytes(own)
    assert rep["ratio"] == pytest.approx(3, rel=0.03)
    first = own.groups[0].segments[1].keys
    assert first.owns_mean and first.basis is own.calibration.stores[0, "k"].basis
    assert not torch.equal(first.mean, own.calibration.stores[0, "k"].mean)
    # on the calibrated basis, coefficients about the prompt's own mean hold the least energy (Σc² = |x − μ|²)
    x = torch.randn(1, 64, 2, 32, generator=torch.Generator().manual_seed(3)) + 5
    calib = own.calibration.stores[0, "k"]
    energy = {mean: float(transform.analyse(x, 64, replace(cfg, params=replace(cfg.params, mean=mean)), kind="k",
                                            layers=[0, 1], shared=calib).c.square().sum()) for mean in MEANS}
    centred = float((x - x.mean(1, keepdim=True)).square().sum())  # the basis is complete: no energy lost
    assert energy["prompt"] == pytest.approx(centred, rel=1e-3) and energy["prompt"] < 0.05 * energy["basis"]
    cfg = replace(cfg, residual_length=4, block_size=16, params=replace(cfg.params, block_tokens=32))
    cache = LowRankCache(cfg, tiny_llama.config)
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    tiny_llama.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, **with_cache(cache), pad_token_id=0,
                        attention_mask=torch.ones_like(ids))
    first, last = cache.groups[0].segments[1].keys, cache.groups[0].segments[-1].keys
    assert last.tokens == 16 and last.mean is first.mean and not last.owns_mean
    assert last.basis is cache.calibration.stores[0, "k"].basis
    rep = cache.memory_report()
    assert rep["total_bytes"] + rep["calibration_bytes"] == held_storage_bytes(cache)


def test_a_calibration_is_refused_for_another_model_grouping_or_a_missing_file(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSVD_MODEL_CACHE", str(tmp_path / "empty"))
    path, cfg = calibrated(tiny_llama, tmp_path, 3)
    other = LlamaConfig(**{**tiny_llama.config.to_dict(), "num_hidden_layers": 2})
    with pytest.raises(ValueError, match="was made for another model: .*num_hidden_layers=4 \\(model: 2\\)"):
        LowRankCache(config_for_ratio(2, 200, other, method="transform", layer_group_size=2, basis="calibrated",
                                      calibration_path=str(path)), other)
    with pytest.raises(ValueError, match=r"was made for layer groups \[\[0, 1, 2\], \[3\]\], not \[\[0, 1\], \[2, 3\]\]"):
        LowRankCache(config_for_ratio(2, 200, tiny_llama.config, method="transform", layer_group_size=2,
                                      basis="calibrated", calibration_path=str(path)), tiny_llama.config)
    with pytest.raises(FileNotFoundError, match="calibration_path='/nowhere.safetensors' does not exist; write it with "
                                                "`python -m kvsvd calibrate MODEL`"):
        LowRankCache(config_for_ratio(2, 200, tiny_llama.config, method="transform", basis="calibrated",
                                      calibration_path="/nowhere.safetensors"), tiny_llama.config)
    with pytest.raises(FileNotFoundError, match=r"basis='calibrated', weighting='mse' reads the model's calibration "
                                                r"\(the default basis from 8x is the calibrated one\), and .*empty/"
                                                r"calibration/llama-L4-G4-s0.safetensors does not exist; accepted: write it "
                                                "with `python -m kvsvd calibrate MODEL --layer-group-size 4 "
                                                "--start-layer 0`, pass calibration_path, or basis='prompt'"):
        config_for_ratio(2, 200, tiny_llama.config, method="transform", basis="calibrated")
    with pytest.raises(ValueError, match="basis='calibrated' needs calibration_path"):
        CompressionConfig.of(method="transform", basis="calibrated")
    with pytest.raises(ValueError, match="calibration_path=.* does not apply to method='xkv'; it takes: "):
        CompressionConfig.of(method="xkv", calibration_path=str(path))
    with pytest.raises(ValueError, match="calibration_path applies to method='transform' with basis='calibrated' or "
                                         "weighting='output' only"):
        CompressionConfig.of(method="transform", calibration_path=str(path))
    with pytest.raises(ValueError, match="key_space='post_rope' does not fit a calibrated basis"):
        CompressionConfig.of(method="transform", key_space="post_rope", calibration_path=str(path), basis="calibrated")
    with pytest.raises(ValueError, match="weighting='output' needs calibration_path"):
        CompressionConfig(method="transform", params=TransformConfig(weighting="output"))
    with pytest.raises(ValueError, match="weighting='bits' is unknown; accepted: mse, output"):
        TransformConfig(weighting="bits")
    from safetensors.torch import save_file
    tensors, meta = Calibration.read(path)  # a file from before sensitivity weights
    save_file({k: v for k, v in tensors.items() if not k.endswith("_weight")}, str(tmp_path / "old.safetensors"),
              metadata={"kvsvd": json.dumps({**meta, "weights": False})})
    with pytest.raises(ValueError, match="old.safetensors' holds no sensitivity weights"):
        LowRankCache(config_for_ratio(2, 200, tiny_llama.config, method="transform", layer_group_size=3,
                                      basis="prompt", weighting="output",
                                      calibration_path=str(tmp_path / "old.safetensors")), tiny_llama.config)


def test_the_calibration_holds_each_features_cost_downstream(tiny_llama, tmp_path):
    """Values: the squared norm of o_proj's columns of the query heads that read the KV head; keys: those heads'
    mean squared queries, both dims of a RoPE pair alike; each kind at mean 1 over the model's layers."""
    path, _ = calibrated(tiny_llama, tmp_path, 3)
    cal = Calibration.load(path, tiny_llama.config, 1, 1, weights=True)
    k = torch.cat([cal.weight(0, "k"), cal.weight(3, "k")])
    v = torch.cat([cal.weight(0, "v"), cal.weight(3, "v")])
    assert k.shape == v.shape == (4 * 32,) and bool((k > 0).all() and (v > 0).all())
    assert float(k.mean()) == pytest.approx(1) and float(v.mean()) == pytest.approx(1)
    pairs = k.reshape(4, 2, 2, 8)  # layers, KV heads, halves of head_dim 16
    torch.testing.assert_close(pairs[:, :, 0], pairs[:, :, 1])
    o = torch.stack([layer.self_attn.o_proj.weight.detach().square().sum(0) for layer in tiny_llama.model.layers])
    expected = o.reshape(4, 2, 2, 16).sum(2).flatten()  # 4 query heads: heads 0, 1 read KV head 0
    torch.testing.assert_close(v, expected / expected.mean())


def test_output_weighting_spends_the_bits_where_errors_cost_most():
    """Two halves of equal variance coded on the feature axes (a calibrated identity basis): with the first
    half's features weighted 100×, its columns take the bits and its error falls."""
    x = torch.randn(1, 512, 1, 32, generator=torch.Generator().manual_seed(0))
    cfg = CompressionConfig(method="transform", layer_group_size=1,
                            params=TransformConfig(ratio=8, sink_tokens=0, basis_dtype="bf16"))
    axes = transform.calibration_store(torch.zeros(32), torch.eye(32), 32, "bf16")
    budget = x.numel() * 2 / 8
    weight = torch.cat([torch.full((16,), 100.0), torch.ones(16)])
    (plain,), _ = transform.compress([(x, 32, "k", [0], axes)], cfg, budget)
    (weighted,), _ = transform.compress([(x, 32, "k", [0], axes)], cfg, budget, weights=[weight])

    def first_half_error(store):
        return float((store.layer(0, torch.float32)[..., :16] - x[:, :, 0, :16]).square().sum())
    assert first_half_error(weighted) < 0.5 * first_half_error(plain)


def test_output_weighting_on_a_prompt_basis_holds_the_weights_once_per_model(tiny_llama, tmp_path):
    path, _ = calibrated(tiny_llama, tmp_path, 2)
    cfg = config_for_ratio(3, 200, tiny_llama.config, method="transform", layer_group_size=2, basis="prompt",
                           weighting="output", calibration_path=str(path), residual_length=8, block_tokens=64)
    cache, _ = prefilled(tiny_llama, cfg)
    assert set(cache.calibration.weights) == {(0, "k"), (0, "v"), (2, "k"), (2, "v")} and not cache.calibration.stores
    rep = cache.memory_report()
    assert rep["calibration_bytes"] == 4 * 2 * 32 * 4  # (G·F,) float32 per group and kind
    assert rep["total_bytes"] == held_storage_bytes(cache) - rep["calibration_bytes"]
    assert 2.7 < rep["ratio"] < 3.3
