"""The kernel benchmark writes one JSON per configuration, resumes, and prints ratios."""

import json

import pytest
import torch

import kvsvd
from kvsvd.__main__ import main
from kvsvd.bench import kernels


def test_smoke_profile_writes_json_and_resumes(tmp_path, capsys):
    assert main(["bench", "kernels", "--profile", "smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    files = sorted(tmp_path.glob("*.json"))
    assert [f.name for f in files] == ["kv_synth_512x64_r8_q2_fp32.json"]
    res = json.loads(files[0].read_text())
    assert res["config"]["rank"] == 8 and res["environment"]["device_type"] == "cpu"
    for spec in kernels.PROFILES["smoke"].methods:
        s = res["methods"][spec]["summary"]
        assert s["count"] == len(res["methods"][spec]["records"]) == 2
        assert s["min_time_ms"] <= s["avg_time_ms"] <= s["max_time_ms"]
        assert 1.0 - 1e-6 <= s["rel_error"] < 1.1
    assert set(res["methods"]["rsvd"]["summary"]["avg_breakdown_ms"]) >= {"preparation", "lift"}
    # every record names the path that ran: auto took the exact Gram path on this narrow matrix
    assert res["methods"]["rsvd"]["path"] == "gram" and res["methods"]["rsvd[qr=householder]"]["path"] == "randomized q2 p8"
    assert "power_iteration" not in res["methods"]["rsvd"]["summary"]["avg_breakdown_ms"]
    out = capsys.readouterr().out
    assert "x lowrank" in out and "rsvd[qr=householder]" in out
    mtime = files[0].stat().st_mtime_ns
    main(["bench", "kernels", "--profile", "smoke", "--device", "cpu", "--out", str(tmp_path)])
    assert files[0].stat().st_mtime_ns == mtime  # finished configurations are not redone


def test_method_spec_parsing():
    assert kernels.MethodSpec("rsvd[qr=householder,compute_dtype=bf16]").parse() == (
        "rsvd", {"qr": "householder", "compute_dtype": torch.bfloat16})
    with pytest.raises(ValueError, match="svd method"):
        kernels.MethodSpec("svd2").parse()
    with pytest.raises(ValueError, match="profile='huge'"):
        kernels.run("huge")


def test_kv_like_matrix_has_outlier_channels_and_a_heavy_tail():
    A = kernels.kv_like_matrix(1024, 64, seed=3)
    norms = A.norm(dim=0)
    assert (norms > 5 * norms.median()).sum() == 4
    s = torch.linalg.svdvals(A)
    assert s[0] / s[-1] > 20


def test_roofline_bound_is_positive_and_scales_with_passes():
    roof = kernels.measure_roofline(torch.device("cpu"), torch.float32, size=256)
    assert roof["bandwidth_Bps"] > 0 and roof["flops"] > 0
    r2 = kernels.roofline_ms(8192, 768, 64, 8, 2, 4, roof)
    r4 = kernels.roofline_ms(8192, 768, 64, 8, 4, 4, roof)
    assert r4 == pytest.approx(r2 * 10 / 6)


@pytest.mark.model
def test_latency_harness_measures_each_length_side_by_side_and_resumes(smollm2, tmp_path):
    from kvsvd.bench import cache as latency
    model, tok = smollm2
    kw = dict(decode_tokens=3, out=tmp_path, model=model, tokenizer=tok, ratios=(4.0,), groups=(1, 2), n_iters=(0,),
              sweep_group=2, transform_group=5)
    payloads = latency.run([256, 320], **kw)
    assert [p["context_tokens"] for p in payloads] == [256, 320]
    res = payloads[0]["results"]
    assert list(res) == ["dense", "svd_G1_4x", "xkv_G2_4x", "xkv_G2_4x_q0", "transform_G5_4x"]
    assert res["xkv_G2_4x_q0"]["config"]["n_iter"] == 0
    for name, r in res.items():
        assert len(r["decode_step_ms"]) == 3 and r["decode_ms_median"] <= max(r["decode_step_ms"])
        assert r["decode_tokens_per_s"] == pytest.approx(3e3 / sum(r["decode_step_ms"]))
        if name != "dense":
            assert r["memory"]["total_bytes"] < r["memory"]["dense16_bytes"] and r["paths"]
            log = r["compression_log"]  # one entry per compressed group (transform: one for all), with its stages
            assert len(log) == {"svd": 30, "xkv": 15, "transform": 1}[name.split("_")[0]]
            assert {"projection", "lift" if name.startswith(("svd", "xkv")) else "encoding"} <= set(log[0]["breakdown_ms"])
    assert "x dense" in latency.table(payloads[0])
    path = tmp_path / "smollm2-135m_256.json"
    mtime = path.stat().st_mtime_ns
    latency.run([256], **kw)
    assert path.stat().st_mtime_ns == mtime  # finished lengths are not remeasured


@pytest.mark.model
def test_attention_bench_compares_three_paths_on_the_same_tokens(smollm2, tmp_path):
    from kvsvd.bench import attention
    model, tok = smollm2
    p = attention.run(300, decode_tokens=2, rounds=2, out=tmp_path, model=model, tokenizer=tok)
    assert set(p["results"]) == {"dense", "reconstruct", "factors"}
    assert all(len(r["step_ms"]) == 4 for r in p["results"].values())
    assert p["results"]["factors"]["kv_ratio"] == p["results"]["reconstruct"]["kv_ratio"] > 2
    assert p["factors_vs_dense"] == pytest.approx(p["results"]["factors"]["tokens_per_s"]
                                                  / p["results"]["dense"]["tokens_per_s"])
    assert model.config._attn_implementation == "sdpa"  # restored
    assert (tmp_path / "smollm2-135m_300_post_rope_4x.json").exists() and "factors vs dense" in attention.table(p)
    with pytest.raises(ValueError, match="context_tokens=9000 .* is out of range; accepted: \\[1, 8192\\]"):
        attention.run(9000, model=model, tokenizer=tok, out=tmp_path)


def test_attention_bench_on_a_random_weight_shape_uses_random_tokens(tmp_path):
    """The GPU measurement's path (random Llama-3.1-shaped weights, no tokenizer), at a tiny shape."""
    from kvsvd.bench import attention
    from kvsvd.models import random_model
    p = attention.run(1024, decode_tokens=2, rounds=3, ratio=8, out=tmp_path, model_name="tiny-llama-shaped")
    assert p["random_weights"] and p["device_name"] is None and p["config"]["method"] == "xkv"
    assert all(len(r["step_ms"]) == 6 for r in p["results"].values())
    assert p["results"]["factors"]["kv_ratio"] > 4
    assert (tmp_path / "tiny-llama-shaped_1024_post_rope_8x.json").exists()
    t = attention.run(1024, decode_tokens=2, rounds=3, ratio=8, out=tmp_path, model_name="tiny-llama-shaped",
                      method="transform")
    assert t["config"]["method"] == "transform" and t["config"]["ratio"] == 8
    assert t["results"]["factors"]["kv_ratio"] == t["results"]["reconstruct"]["kv_ratio"] > 7
    assert (tmp_path / "tiny-llama-shaped_1024_post_rope_8x_transform.json").exists()
    with pytest.raises(ValueError, match="method='pca' is unknown; accepted: lowrank, transform"):
        attention.run(1024, out=tmp_path, model_name="tiny-llama-shaped", method="pca")
    model = random_model("tiny-llama-shaped")
    assert model.config.rope_parameters["rope_type"] == "llama3" and model.config.num_key_value_heads == 2
    with pytest.raises(ValueError, match="random model 'llama-9b' is unknown; accepted: llama-3.1-8b-shaped"):
        random_model("llama-9b")


def test_latency_harness_refuses_context_lengths_the_model_cannot_hold(tiny_llama, tmp_path):
    from kvsvd.bench import cache as latency
    with pytest.raises(ValueError, match=r"context_lengths \[600, 0\] out of range; accepted: integers in \[1, 480\]"):
        latency.run([256, 600, 0], decode_tokens=32, out=tmp_path, model=tiny_llama, tokenizer=None)


def test_rank_independent_work_is_done_once_per_matrix(tmp_path, monkeypatch):
    """full_svd is timed in the first configuration of a matrix only (same records in every file),
    and each configuration's error still comes from its own rank."""
    calls = {"full_svd": 0}
    real = kernels.get_svd

    def counting(name):
        fn = real(name)
        if name != "full_svd":
            return fn

        def wrapped(*args, **kwargs):
            calls["full_svd"] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(kernels, "get_svd", counting)
    monkeypatch.setitem(kernels.PROFILES, "two_ranks", kernels.Profile(
        shapes=[(256, 48)], ranks=[4, 12], n_iters=[1, 2], repeats=3, methods=["full_svd", "rsvd"]))
    results = kernels.run("two_ranks", out=tmp_path)
    assert len(results) == 4 and len(list(tmp_path.glob("*.json"))) == 4
    assert calls["full_svd"] == 1 + 3  # one full-rank warm-up and 3 timed calls, not 4 × (1 + 3)
    full = [r["methods"]["full_svd"] for r in results]
    assert all(f["records"] == full[0]["records"] and f["timed_once_per_matrix"] for f in full)
    for res in results:
        assert res["methods"]["full_svd"]["summary"]["rel_error"] == pytest.approx(1.0, abs=1e-5)
        assert not res["methods"]["rsvd"]["timed_once_per_matrix"]
        assert len(res["methods"]["rsvd"]["records"]) == 3
    errs = {r["config"]["rank"]: r["methods"]["full_svd"]["summary"]["error"] for r in results}
    A = kernels.kv_like_matrix(256, 48)
    for rank, err in errs.items():
        assert err == pytest.approx(float(kvsvd.optimal_error(A, rank)), rel=1e-5)


def test_gpu_script_commands_parse_and_fit_one_device_call():
    """.ci/gpu cannot run without a GPU; its kvsvd commands must still parse, and the time
    limits of its steps must leave room inside one 600 s device call."""
    import re
    import shlex
    from pathlib import Path

    from kvsvd.__main__ import build_parser
    script = (Path(__file__).parents[1] / ".ci" / "gpu").read_text()
    commands = re.findall(r"\$PY -m kvsvd (.+)", script)
    assert len(commands) == 2
    for cmd in commands:
        args = build_parser().parse_args(shlex.split(cmd.replace('"$T"', "32768")))
        assert args.command == "bench"
    limits = [int(t) for t in re.findall(r"timeout (\d+)", script)]
    loops = len(re.findall(r"for T in (\d+) (\d+);", script)[0])
    assert sum(limits) + limits[-1] * (loops - 1) <= 570


def test_operator_bench_attends_from_the_codes_exactly_as_over_the_rebuilt_cache(tmp_path, capsys):
    """One decode step, Llama-3.1-8B-shaped, at a short context: every path on the same q, K, V; attention
    from the codes gives what attention over the rebuilt K and V gives (the same stores), at the bytes asked."""
    from kvsvd.bench import operator
    p = operator.run((512,), (4.0, 16.0), repeats=1, out=tmp_path)
    rows = {(r["path"], r.get("target_ratio")): r for r in p["rows"]}
    assert set(rows) == {("dense SDPA", None), ("dense grouped matmul", None), ("dense FP32 grouped matmul", None),
                         ("codes", 4.0), ("codes, keys rebuilt", 4.0), ("codes", 16.0), ("codes, keys rebuilt", 16.0)}
    assert rows["dense SDPA", None]["bytes_per_step"] == 2 * 512 * 8 * 128 * 2
    assert rows["dense FP32 grouped matmul", None]["ratio"] == 0.5
    for ratio in (4.0, 16.0):
        latent, rebuilt = rows["codes", ratio], rows["codes, keys rebuilt", ratio]
        assert latent["ratio"] == pytest.approx(ratio, rel=0.02) and latent["bytes_per_step"] == rebuilt["bytes_per_step"]
        assert latent["rel_error"] == pytest.approx(rebuilt["rel_error"], rel=1e-4)
        assert latent["roofline_ms"] == pytest.approx(latent["bytes_per_step"] / p["bandwidth_gb_s"] / 1e6)
    assert rows["codes", 4.0]["rel_error"] < rows["codes", 16.0]["rel_error"] < 1
    assert rows["dense grouped matmul", None]["rel_error"] < 0.01  # bf16 K and V against FP32
    assert p["shape"]["kv_heads"] == 8 and p["threads"] == torch.get_num_threads()
    assert "codes, keys rebuilt" in operator.table(p) and (tmp_path / "cpu.json").exists()
    assert operator.run((512,), out=tmp_path) == p  # on disk: not remeasured
    with pytest.raises(ValueError, match=r"context_lengths \[100\] are out of range; accepted: integers >= 256"):
        operator.run((100,), out=tmp_path)
    with pytest.raises(FileNotFoundError, match="spectra_csv='/nowhere.csv' does not exist"):
        operator.measured_spectrum("/nowhere.csv", "v")
    spectrum = operator.measured_spectrum(kvsvd.__path__[0] + "/../results/analysis/spectra.csv", "v")
    assert spectrum.shape == (128,) and spectrum[0] == 1 and bool((spectrum.diff() <= 1e-6).all())


def test_decode_bench_times_every_method_on_the_same_tokens_against_dense(tiny_llama, tmp_path):
    """Every method decodes the same teacher-forced tokens; a kvsvd cache through both of its paths from one
    compressed cache; speeds are against the dense cache of the same run; a finished length is not remeasured."""
    from kvsvd.bench import decode
    from conftest import ByteTokenizer
    methods = ({"method": "none"}, {"method": "dense16"},
               {"method": "transform", "ratio": 4, "basis": "prompt", "layer_group_size": 2},
               {"method": "xkv", "layer_group_size": 2, "ratio": 4, "key_space": "pre_rope"})
    kw = dict(decode_tokens=2, rounds=3, methods=methods, out=tmp_path, model=tiny_llama, tokenizer=ByteTokenizer(),
              model_name="tiny")
    (p,) = decode.run([200], **kw)
    res = p["results"]
    assert list(res) == ["dense", "dense bf16", *(f"{m} · {path}" for m in (
        "transform G2 4x pre_rope basis int8 sinks 4 window 32 q2", "xkv G2 4x pre_rope bf16 q2")
        for path in ("kvsvd attention", "rebuilt K/V"))]
    assert all(len(r["step_ms"]) == 6 for r in res.values()) and res["dense"]["vs_dense"] == 1
    for r in res.values():
        assert r["tokens_per_s"] == pytest.approx(1e3 / r["ms_per_token_median"])
        assert r["vs_dense"] == pytest.approx(res["dense"]["ms_per_token_median"] / r["ms_per_token_median"])
    assert res["dense bf16"]["kv_ratio"] == pytest.approx(1) and res["dense"]["kv_ratio"] == pytest.approx(0.5)
    xkv = [r for name, r in res.items() if name.startswith("xkv")]
    assert [r["attention"] for r in xkv] == ["kvsvd", "sdpa"] and xkv[0]["kv_ratio"] == xkv[1]["kv_ratio"] > 2
    assert tiny_llama.config._attn_implementation == "sdpa"  # restored
    path = tmp_path / "tiny_200.json"
    mtime = path.stat().st_mtime_ns
    decode.run([200], **kw)
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="methods must start with {'method': 'none'}"):
        decode.run([200], **{**kw, "methods": methods[1:]})
    with pytest.raises(ValueError, match=r"context_lengths \[600\] out of range; accepted: integers in \[1, 506\]"):
        decode.run([600], **kw)


@pytest.mark.peers
def test_decode_bench_times_the_peers_caches_and_presses(tiny_llama, tmp_path):
    from kvsvd.bench import decode
    from conftest import ByteTokenizer
    pytest.importorskip("kvpress")
    peers = ({"method": "none"}, {"method": "press", "press": "tova", "ratio": 4},
             {"method": "quantized", "backend": "quanto", "nbits": 4}, {"method": "turboquant", "nbits": 4})
    (p,) = decode.run([200], decode_tokens=2, rounds=3, methods=peers, out=tmp_path, model=tiny_llama,
                      tokenizer=ByteTokenizer(), model_name="tiny")
    assert list(p["results"]) == ["dense", "tova 4x", "quantized quanto int4", "turboquant 4-bit"]
    assert all(len(r["step_ms"]) == 6 and r["paths"] is None for r in p["results"].values())
    assert p["results"]["tova 4x"]["kv_ratio"] > 3
