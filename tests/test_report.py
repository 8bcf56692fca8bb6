"""Score tables and goal checks of a grid's results (kvsvd.report), on rows with known scores."""

import json

import pandas as pd
import pytest

from kvsvd import report
from kvsvd.__main__ import main
from kvsvd.results import load_results

pytestmark = pytest.mark.core  # also run in the current environment

XKV = {"method": "xkv", "layer_group_size": 2, "ratio": 4, "key_space": "pre_rope"}
RANDOMIZED = "xkv G2 4x pre_rope bf16 q2 qr=householder → randomized"
METHODS = {  # name -> (method, score on every sample, measured ratio, paths)
    "dense": ({"method": "none"}, 90.0, 0.5, {"dense fp32": 60}),
    "dense16": ({"method": "dense16"}, 90.0, 1.0, {"dense bf16": 60}),
    "xkv": (XKV, 89.5, 3.7, {"gram bf16": 30}),  # qr=auto took the exact Gram path
    "xkv_randomized": ({**XKV, "qr": "householder"}, 89.0, 3.7, {"randomized q2 p8 bf16": 30}),
    "xkv_exact": ({**XKV, "svd": "full_svd"}, 88.0, 3.7, {"full bf16": 30}),
    "xkv_q0": ({**XKV, "n_iter": 0, "qr": "householder"}, 50.0, 3.7, {"randomized q0 p8 bf16": 30}),
    "svd8": ({"method": "svd", "ratio": 8, "key_space": "pre_rope"}, 20.0, 7.5, {"gram bf16": 60}),
    "knorm": ({"method": "press", "press": "knorm", "ratio": 4}, 60.0, 3.75, {"knorm eviction, dense bf16": 60}),
    "snapkv8": ({"method": "press", "press": "snapkv", "ratio": 8}, 30.0, 7.9, {"snapkv eviction, dense bf16": 60}),
    "int4": ({"method": "quantized", "nbits": 4}, 85.0, 2.7, {"quanto int4": 60}),
    "int2": ({"method": "quantized", "nbits": 2}, 10.0, 4.2, {"quanto int2": 60}),
    "transform8": ({"method": "transform", "basis": "prompt", "layer_group_size": 5, "ratio": 8}, 35.0, 8.1,
                   {"gram transform int8": 12, "dense bf16": 12}),
    "calibrated16": ({"method": "transform", "basis": "calibrated", "ratio": 16}, 40.0, 16.2,
                     {"calibrated basis transform int8": 12, "dense bf16": 12}),
}
EXTRA = {"calibrated16": {"kv_bytes_by_kind": {"calibration": 11 * 2**20}, "kv_ratio_all_in": 3.4}}


def write_rows(path, methods=METHODS, paths=True):
    rows = []
    for task, offset in (("niah_single_1", 0.0), ("vt", -80.0)):
        for i in range(3):
            for name, (method, score, ratio, held) in methods.items():
                rows.append({"key": json.dumps([method, task, i]), "method": method, "task": task,
                             "context_length": 2048, "index": i, "score": max(0.0, score + offset),
                             "kv_ratio": ratio, "gold_logprob": -0.04 * (100 - score), "gold_tokens": 4,
                             **({"paths": held} if paths else {}), **EXTRA.get(name, {})})
    rows.append({**rows[0], "key": "unfinished", "index": 3, "score": 0.0})  # only dense has sample 3 yet
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def results(tmp_path):
    return write_rows(tmp_path / "r.jsonl")


def test_score_table_averages_headline_tasks_and_labels_what_ran(results):
    table = report.score_table(report.tidy(load_results(results)), 2048)
    assert table.index[0] == "dense" and list(table["n"].unique()) == [3]
    assert table.at["dense", "average"] == 90.0  # vt (reported only) and the unfinished sample are not averaged in
    assert table.at["dense", "vt"] == 10.0 and table.at["knorm 4x", "ratio"] == 3.75
    assert list(table["ratio"].iloc[1:]) == sorted(table["ratio"].iloc[1:])
    assert table.at["xkv G2 4x pre_rope bf16 q2 → gram", "svd_ran"] == "gram"  # asked rsvd, ran the Gram path
    assert table.at[RANDOMIZED, "svd_ran"] == "randomized"
    assert "xkv G2 4x pre_rope bf16 full_svd" in table.index and "quantized quanto int4" in table.index


def test_a_row_with_a_ratio_and_no_paths_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has kv_ratio but no paths"):
        load_results(write_rows(tmp_path / "old.jsonl", paths=False))


def test_goal_checks_compare_with_quantisation_peers_and_the_exact_svd_on_the_randomized_path(results):
    df = report.tidy(load_results(results))
    g = report.goal_checks(df, 2048, ratio=4)
    assert g["best_kvsvd"] == "xkv G2 4x pre_rope bf16 q2 → gram" and g["best_kvsvd_score"] == 89.5
    assert g["within_2_of_dense"] and g["ahead_of_every_press"] and g["best_press"] == "knorm 4x"
    assert g["best_quantized"] == "quantized quanto int2" and g["ahead_of_every_quantized"]
    assert g["dominated_by"] is None
    g2 = report.goal_checks(df, 2048, ratio=8)  # svd 8x (20 at 7.5x) is beaten by snapkv 8x (30 at 7.9x)
    assert g2["dominated_by"] == "snapkv 8x"
    (e,) = g["n_iter2_vs_exact"]  # the Gram-path row is not a randomized twin of the exact SVD
    assert (e["config"], e["rsvd_q2"], e["full_svd"]) == (RANDOMIZED, 89.0, 88.0)
    assert e["delta"] == pytest.approx(1.0) and e["delta_ci"][0] <= e["delta"] <= e["delta_ci"][1]
    g8 = report.goal_checks(df, 2048, ratio=8)
    assert not g8["within_2_of_dense"] and not g8["ahead_of_every_press"] and "best_quantized" not in g8
    assert g8["best_transform"].startswith("transform G5 8x") and g8["transform_ahead_of_every_press"]
    assert g8["transform_dominated_by"] is None  # snapkv 8x (30) holds more bytes (7.9x) and scores less
    assert not g8["transform_within_2_of_dense"] and "best_transform" not in g


def test_headline_takes_the_best_method_of_each_family_at_matched_ratios(results):
    h = report.headline(report.score_table(report.tidy(load_results(results)), 2048)).set_index(["target", "family"])
    assert h.loc[(2.7, "quantized cache"), "method"] == "quantized quanto int4"
    assert h.loc[(4, "kvsvd"), "average"] == 89.5 and h.loc[(4, "kvpress"), "method"] == "knorm 4x"
    assert h.loc[(8, "kvpress"), "method"] == "snapkv 8x" and (2, "kvsvd") not in h.index


def test_a_target_ratio_takes_up_to_15_percent_more_bytes_or_30_percent_fewer():
    table = pd.DataFrame({"ratio": [13.8, 14.0, 16.0, 18.8, 20.9]}, index=list("abcde"))
    assert list(report.at_ratio(table, 16)) == ["b", "c", "d"]


def test_earlier_variants_short_of_samples_are_left_out_so_every_row_shares_them():
    """A row of settings no grid runs any more (``rope_tables``) never finishes: short of any sample, it is left
    out instead of cutting every method down to its samples; a current method is left out only below half."""
    from kvsvd.results import earlier_variant
    assert earlier_variant({"method": "xkv", "ratio": 4, "rope_tables": True})
    assert earlier_variant({"method": "press", "press": "tova", "fp32_ratio": 4})
    assert not earlier_variant({"method": "transform", "ratio": 8, "basis": "calibrated"})
    rows = [{"label": lbl, "task": "niah_single_1", "index": i, "context_length": 2048, "earlier_variant": old}
            for lbl, n, old in (("dense", 10, False), ("old", 9, True), ("running", 6, False), ("begun", 4, False))
            for i in range(n)]
    assert dict(report.unfinished(pd.DataFrame(rows), 2048)) == {"begun": 4, "old": 9}


def test_report_command_prints_the_tables(results, capsys):
    assert main(["report", str(results)]) == 0
    out = capsys.readouterr().out
    assert f"| {RANDOMIZED} | 3.70 | 89.0 | 9.0 | 89.0 | -1.0 [-1.0, -1.0] | 0.110 | 3 |" in out
    assert "| 2.7× | quantized cache | quantized quanto int4 | 2.70 | 85.0 | -5.0 [-5.0, -5.0] |" in out
    assert "≈4×: dense 90.0; best kvsvd xkv G2 4x pre_rope bf16 q2 → gram 89.5" in out
    assert ("Calibrated rows: × counts the calibration once per model, as every sequence shares it; held by one "
            "sequence alone: transform G5 16x pre_rope calibrated basis int8 sinks 4 window 4 new blocks 16 11.0 MiB "
            "of calibration, 3.40× all in") in out


def test_difference_to_dense_is_paired_with_a_bootstrap_interval():
    rows = [{"label": label, "task": task, "index": i, "score": score}
            for task in ("niah_single_1", "niah_single_2") for i in range(10)
            for label, score in (("dense", 100.0), ("flaky", 100.0 * (i % 2)), ("same", 100.0))]
    d = report.paired_delta(pd.DataFrame(rows), ["niah_single_1", "niah_single_2"])
    assert d.at["same", "delta"] == d.at["same", "delta_lo"] == d.at["same", "delta_hi"] == 0
    assert d.at["flaky", "delta"] == -50 and -80 < d.at["flaky", "delta_lo"] < -50 < d.at["flaky", "delta_hi"] < -20
    vs_flaky = report.paired_delta(pd.DataFrame(rows), ["niah_single_1", "niah_single_2"], reference="flaky")
    assert vs_flaky.at["same", "delta"] == 50 and vs_flaky.at["flaky", "delta"] == 0
    no_dense = report.paired_delta(pd.DataFrame([r for r in rows if r["label"] != "dense"]), ["niah_single_1"])
    assert no_dense["delta"].isna().all()


def test_a_method_a_grid_has_only_begun_is_left_out_not_cutting_the_others_down(tmp_path, capsys):
    """A method with one of six (task, sample) pairs finished would cut every row to that pair: it is left
    out of the tables and named with its count, and the others keep all their samples."""
    path = write_rows(tmp_path / "r.jsonl")
    begun = {"method": "transform", "layer_group_size": 5, "ratio": 4}
    row = {"key": "begun", "method": begun, "task": "niah_single_1", "context_length": 2048, "index": 0,
           "score": 0.0, "kv_ratio": 4.0, "gold_logprob": -1.0, "gold_tokens": 4, "paths": {"gram transform int8": 12}}
    path.write_text(path.read_text() + json.dumps(row) + "\n")
    df = report.tidy(load_results(path))
    label = "transform G5 4x pre_rope basis int8 sinks 4 window 32 q2 → gram"
    assert list(report.unfinished(df, 2048).items()) == [(label, 1)]
    table = report.score_table(df, 2048)
    assert label not in table.index and list(table["n"].unique()) == [3]
    assert main(["report", str(path)]) == 0
    assert ("Left out, so that every row is on the same samples: methods short of samples (pairs of task and sample "
            f"finished, of 7; an earlier variant no grid runs any more, or a method still running): {label} (1)") \
        in capsys.readouterr().out
