"""Score tables and goal checks of a grid's results (kvsvd.report), on rows with known scores."""

import json

import pandas as pd
import pytest

from kvsvd import report
from kvsvd.__main__ import main
from kvsvd.grid import load_results

METHODS = {  # method -> (score on every sample, measured ratio)
    "dense": ({"method": "none"}, 90.0, 1.0),
    "xkv": ({"method": "xkv", "layer_group_size": 2, "ratio": 4, "key_space": "pre_rope"}, 89.0, 3.7),
    "xkv_exact": ({"method": "xkv", "layer_group_size": 2, "ratio": 4, "key_space": "pre_rope", "svd": "full_svd"},
                  88.0, 3.7),
    "xkv_q0": ({"method": "xkv", "layer_group_size": 2, "ratio": 4, "key_space": "pre_rope", "n_iter": 0}, 95.0, 3.7),
    "svd8": ({"method": "svd", "ratio": 8, "key_space": "pre_rope"}, 20.0, 6.9),
    "knorm": ({"method": "press", "press": "knorm", "ratio": 4}, 60.0, 3.75),
    "snapkv8": ({"method": "press", "press": "snapkv", "ratio": 8}, 30.0, 6.9),
}


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "r.jsonl"
    rows = []
    for task, offset in (("niah_single_1", 0.0), ("vt", -80.0)):
        for i in range(3):
            for method, score, ratio in METHODS.values():
                rows.append({"key": json.dumps([method, task, i]), "method": method, "task": task,
                             "context_length": 2048, "index": i, "score": max(0.0, score + offset),
                             "kv_ratio": ratio, "gold_logprob": -0.04 * (100 - score), "gold_tokens": 4})
    rows.append({**rows[0], "key": "unfinished", "index": 3, "score": 0.0})  # only dense has sample 3 yet
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_table_averages_headline_tasks_and_counts_samples(results):
    table = report.score_table(report.tidy(load_results(results)), 2048)
    assert table.index[0] == "dense" and list(table["n"].unique()) == [3]
    assert table.at["dense", "average"] == 90.0  # vt (reported only) and the unfinished sample are not averaged in
    assert table.at["dense", "vt"] == 10.0 and table.at["knorm 4x", "ratio"] == 3.75
    assert list(table["ratio"].iloc[1:]) == sorted(table["ratio"].iloc[1:])


def test_goal_checks_use_the_rsvd_n_iter2_methods_and_compare_with_the_exact_svd(results):
    g = report.goal_checks(report.tidy(load_results(results)), 2048, ratio=4)
    assert g["best_kvsvd"] == "xkv G2 4x pre_rope"  # not the q0 sweep row, though it scores higher
    assert g["within_2_of_dense"] and g["ahead_of_every_press"] and g["best_press"] == "knorm 4x"
    (e,) = g["n_iter2_vs_exact"]
    assert (e["config"], e["rsvd_q2"], e["full_svd"]) == ("xkv G2 4x pre_rope", 89.0, 88.0)
    assert e["delta"] == pytest.approx(1.0) and e["delta_ci"][0] <= e["delta"] <= e["delta_ci"][1]
    g8 = report.goal_checks(report.tidy(load_results(results)), 2048, ratio=8)
    assert not g8["within_2_of_dense"] and not g8["ahead_of_every_press"]


def test_report_command_prints_the_tables(results, capsys):
    assert main(["report", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| xkv G2 4x pre_rope | 3.70 | 89.0 | 9.0 | 89.0 | -1.0 [-1.0, -1.0] | 0.110 | 3 |" in out
    assert "≈4×: dense 90.0; best kvsvd xkv G2 4x pre_rope 89.0" in out


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
