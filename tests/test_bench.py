"""The kernel benchmark writes one JSON per configuration, resumes, and prints ratios."""

import json

import pytest
import torch

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
