"""Spectrum statistics, layer similarity and the compressibility sweep behind notebooks 01 and 03."""

import pytest
import torch

from kvsvd import analysis, workbook
from kvsvd.compat import with_cache
from kvsvd.orth import ORTH_METHODS

pytestmark = pytest.mark.core  # also run in the current environment


def test_spectrum_statistics_on_known_spectra():
    flat = torch.ones(8, dtype=torch.float64)
    assert analysis.effective_rank(flat) == pytest.approx(8.0)
    assert analysis.effective_rank(torch.tensor([1.0, 0, 0])) == pytest.approx(1.0)
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert analysis.rank_for_energy(s, 0.6) == 1 and analysis.rank_for_energy(s, 0.9) == 2
    assert analysis.rank_for_energy(s, 1.0) == 3
    with pytest.raises(ValueError, match="fraction=0 is out of range"):
        analysis.rank_for_energy(s, 0)
    x = torch.randn(500, 4, dtype=torch.float64) * torch.tensor([10.0, 1.0, 1.0, 1.0])
    assert analysis.variance_spread(x, heads=1)[0] == pytest.approx(100, rel=0.3)


def test_similarity_measures_are_invariant_and_bounded():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 20, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    assert analysis.linear_cka(x, 3 * x @ Q) == pytest.approx(1.0)  # rotation and scale invariant
    y = torch.randn(300, 20, generator=g, dtype=torch.float64)
    assert analysis.linear_cka(x, y) < 0.2
    assert analysis.token_subspace_overlap(x, x @ Q, 5) == pytest.approx(1.0)
    assert analysis.token_subspace_overlap(x, y, 5) < 0.2


def test_layer_similarity_is_the_pairwise_measures_over_every_layer_pair():
    g = torch.Generator().manual_seed(2)
    k = [torch.randn(60, 8, generator=g) for _ in range(3)]
    k[2] = k[0] @ torch.linalg.qr(torch.randn(8, 8, generator=g))[0]  # layer 2 is layer 0 rotated
    sample = analysis.KVSample(k, k, k, torch.ones(60, 4), torch.zeros(60, 4), heads=2, kv_heads=2, head_dim=4)
    df = analysis.layer_similarity(sample, "v", rank=3).set_index(["layer_a", "layer_b"])
    assert len(df) == 9
    for a in range(3):
        for b in range(3):
            assert df.loc[(a, b), "cka"] == pytest.approx(analysis.linear_cka(k[a], k[b]), rel=1e-9)
            assert df.loc[(a, b), "overlap"] == pytest.approx(analysis.token_subspace_overlap(k[a], k[b], 3), rel=1e-9)
    assert df.loc[(0, 2), "cka"] == pytest.approx(1.0) and df.loc[(0, 1), "cka"] < 0.5


def test_attention_output_matches_sdpa_with_gqa():
    g = torch.Generator().manual_seed(1)
    T, Hq, H, d, n = 40, 4, 2, 8, 6
    q, k, v = (torch.randn(T, h * d, generator=g) for h in (Hq, H, H))
    out = analysis.attention_output(q, k, v, Hq, H, n)
    qh = q.reshape(T, Hq, d).transpose(0, 1)[:, None]
    kh = k.reshape(T, H, d).transpose(0, 1).repeat_interleave(2, 0)[:, None]
    vh = v.reshape(T, H, d).transpose(0, 1).repeat_interleave(2, 0)[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)[:, 0, T - n:]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_rank_for_ratio_counts_factors_and_scales_against_16_bit():
    budget = 1000 * 192 * 2 / 4  # a 16-bit (1000 × 192) matrix at 4x
    r = analysis.rank_for_ratio(4, 1000, 192, "bf16")
    assert (1000 + 192) * r * 2 <= budget < (1000 + 192) * (r + 1) * 2
    r32 = analysis.rank_for_ratio(4, 1000, 192, "fp32")
    assert (1000 + 192) * r32 * 4 <= budget < (1000 + 192) * (r32 + 1) * 4 and r32 == r // 2
    r8 = analysis.rank_for_ratio(4, 1000, 192, "int8")
    assert 1000 * r8 + 1000 * 2 + 192 * r8 * 2 <= budget
    assert r8 > 1.5 * r
    with pytest.raises(ValueError, match="factor_dtype='int3' is unknown"):
        analysis.rank_for_ratio(4, 1000, 192, "int3")


@pytest.mark.model
def test_sample_and_compressibility_on_smollm2(smollm2):
    model, tok = smollm2
    s = analysis.sample_kv(model, tok, 128)
    assert s.num_layers == 30 and s.k[0].shape == (128, 192) and s.q[0].shape == (128, 576)
    # post-RoPE keys equal what the model's own cache stores
    from transformers import DynamicCache
    from kvsvd.bench.kernels import natural_text
    ids = tok(natural_text(128 * 8), return_tensors="pt").input_ids[:, :128]
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, **with_cache(cache))
    stored = cache.layers[3].keys[0].transpose(0, 1).reshape(128, -1)
    torch.testing.assert_close(s.matrix("k_post", 3), stored, atol=1e-4, rtol=1e-4)
    stats, spectra = analysis.spectrum_tables(s)
    assert len(stats) == 3 * 30 * 3 and set(stats["kind"]) == set(analysis.KINDS)
    df = analysis.compressibility(s, kinds=("k_pre", "v"), groups=(1, 2), ratios=(4, 8), factor_dtypes=("fp32", "int8"))
    assert len(df) == 2 * 2 * 2 * 2 * 24
    assert (df["ratio"] > 0.9 * df["target_ratio"]).all() and (df["ratio"] < 1.3 * df["target_ratio"]).all()
    m = df.groupby(["kind", "target_ratio"])["recon_error"].mean()
    assert (m.xs(4, level=1) < m.xs(8, level=1)).all()  # more bytes, less error
    assert ((df["recon_error"] > 0) & (df["recon_error"] < 1)).all()


@pytest.mark.model
def test_rate_distortion_orders_the_codes_and_stays_above_the_bound(smollm2):
    """On real K/V (256 tokens, layers 13-17): every code holds no more bits than its budget says (the int
    quantisers' scales aside), transform coding has less error than truncation at each budget, less still on
    a basis calibrated on other text or on the prompt's own basis held free, less with vector codes than with
    scalar ones, and no code beats the Gaussian bound at the same bits."""
    model, tok = smollm2
    calibration = analysis.sample_kv(model, tok, 256, calibration=True)
    df = analysis.rate_distortion(analysis.sample_kv(model, tok, 256), bits=(1, 2), calibration=calibration)
    assert set(df["method"]) == set(analysis.RD_METHODS) and set(df["kind"]) == {"k_pre", "v"}
    coded = df[df["method"].isin(["truncation", "transform"])]
    assert (coded["bits_per_entry"] <= 2 * 1.001).all()
    for kind in ("k_pre", "v"):
        for b in (1, 2):
            at = analysis.at_budget(df[df["kind"] == kind], b)[kind]
            assert at["transform"] < at["truncation"]
            assert at["Gaussian bound"] < at["transform, calibrated basis"] < at["transform"]  # no basis rows to pay
            assert at["Gaussian bound"] < at["transform, calibrated basis, prompt mean"]
            # the prompt's own exact basis, held free, is what the quantiser alone loses: the least transform error
            assert at["Gaussian bound"] < at["transform, the prompt's own basis uncounted"] < at["transform"]
            # vector codes below 3 bits per entry: less error than the scalar quantiser's at the same bytes
            ideal = "transform, the prompt's own basis uncounted"
            assert at["Gaussian bound"] < at[f"{ideal}, vector codes"] < at[ideal]
    four = analysis.at_budget(df, 4.1)
    assert (four.loc["per-token int"] > 0).all() and four.loc["per-channel int"].notna().all()


@pytest.mark.model
def test_a_calibrated_basis_costs_the_prompt_no_basis_rows(smollm2):
    """Per prompt and calibrated bases at the same budget: both hold about the bits per entry asked
    (the calibrated one's int16 row index aside), only the per-prompt one holds basis rows, and the
    calibrated basis (fitted on other prose) is held once, apart."""
    model, tok = smollm2
    df = analysis.basis_by_context(model, tok, (128, 256), bits=(2,), calib_tokens=256, group=range(13, 15))
    assert len(df) == 2 * 2 * 2 and set(df["basis"]) == {"per prompt", "calibrated"}
    own, cal = df[df["basis"] == "per prompt"], df[df["basis"] == "calibrated"]
    assert (own["bits_per_entry"] <= 2).all() and (df["bits_per_entry"] > 1.5).all()
    index_bits = 16 * cal["kept"] / (cal["tokens"] * 2 * 192)  # int16 row index, outside the allocation's model
    assert (cal["bits_per_entry"] <= 2 + index_bits + 1e-9).all()
    assert (own["basis_bytes"] > 0).all() and (own["calibration_bytes"] == 0).all()
    assert (cal["basis_bytes"] == 0).all() and (cal["calibration_bytes"] > 0).all()
    assert (cal["kept"].to_numpy() > own["kept"].to_numpy()).all()  # no basis rows to pay for: more columns get bits
    assert (df["rel_error"] < 1).all()


def test_orthogonality_sweep_records_breakdowns():
    df = analysis.orthogonality_vs_kappa(sorted(ORTH_METHODS), kappas=(1e1, 1e8), m=256, n=16)
    assert len(df) == len(ORTH_METHODS) * 2 * 2
    hh = df[(df["method"] == "householder") & (df["dtype"] == "fp32")]
    assert (hh["orth_error"] < 1e-5).all()
    bad = df[(df["method"] == "cholqr") & (df["kappa"] == 1e8) & (df["dtype"] == "fp32")]
    assert bad["failed"].item() or bad["orth_error"].item() > 1e-2


def test_workbook_settings_name_the_accepted_values():
    assert workbook.settings("03_kv_compressibility", "smoke")["tokens"] == 256
    with pytest.raises(ValueError, match="profile='tpu' is unknown; accepted: smoke, cpu, gpu"):
        workbook.settings("01_spectrum_analysis", "tpu")
    with pytest.raises(ValueError, match="notebook='05' is unknown"):
        workbook.settings("05", "cpu")
