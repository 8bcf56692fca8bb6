"""The evaluation grid: validation, resumable JSONL, corrupt lines, DataFrame, torchrun sharding."""

import gzip
import json
import os
import subprocess
import sys

import pytest
import torch

from kvsvd import CompressionConfig, accounting, grid, gridspec, results
from kvsvd.__main__ import main
from kvsvd.evaluate import fan_out_prefill
from kvsvd.peers.press import PRESSES

BASE = {"name": "t", "model": "smollm2-135m", "tasks": ["niah_single_1"], "context_lengths": [384], "n_samples": 2,
        "max_new_tokens": 4, "methods": [{"method": "xkv", "layer_group_size": 2, "ratio": 3},
                                          {"method": "press", "press": "knorm", "ratio": 3}]}


def cfg(tmp_path, **kw):
    return {**BASE, "out": str(tmp_path / "r.jsonl"), **kw}


@pytest.mark.parametrize("change, pattern", [
    ({"colour": 1}, r"unknown grid key\(s\) \['colour'\]"),
    ({"tasks": ["niah_9"]}, "tasks: 'niah_9' is unknown"),
    ({"methods": [{"method": "lora"}]}, r"methods\[0\]: method='lora' is unknown; accepted: none, dense16, press"),
    ({"methods": [{"method": "press", "press": "magic"}]}, r"methods\[0\]: press='magic' is unknown"),
    ({"methods": [{"method": "press", "ratio": 4}]}, r"methods\[0\]: method 'press' needs key\(s\) \['press'\]"),
    ({"methods": [{"method": "svd", "ratio": 1}]}, r"methods\[0\]: ratio=1 is out of range"),
    ({"methods": [{"method": "svd", "rnak_k": 3}]}, r"methods\[0\]: key\(s\) \['rnak_k'\] do not apply to method 'svd'"),
    ({"methods": [{"method": "press", "press": "tova", "ratio": 2, "rank_k": 8}]},
     r"methods\[0\]: key\(s\) \['rank_k'\] do not apply to method 'press'; accepted: \['method', 'press', 'ratio'\]"),
    ({"methods": [{"method": "xkv", "ratio": 2, "basis": "calibrated"}]},
     r"methods\[0\]: key\(s\) \['basis'\] do not apply to method 'xkv'"),
    # a method's own keys only: minicache has no ratio to budget, the transform coder no rank split
    ({"methods": [{"method": "minicache", "ratio": 4}]}, r"key\(s\) \['ratio'\] do not apply to method 'minicache'"),
    ({"methods": [{"method": "transform", "ratio": 4, "k_share": 0.5}]},
     r"key\(s\) \['k_share'\] do not apply to method 'transform'"),
    ({"methods": [{"method": "quantized", "backend": "gptq"}]},
     r"methods\[0\]: backend='gptq' is unknown; accepted: quanto, hqq"),
    ({"methods": [{"method": "turboquant", "nbits": 0}]}, r"methods\[0\]: nbits=0 is out of range"),
    ({"context_lengths": [100]}, "context_lengths"),
    ({"max_new_tokens": {"vt": 30}}, r"max_new_tokens=\{'vt': 30\} is out of range; accepted: an integer >= 1, or one "),
    ({"max_new_tokens": 0}, "max_new_tokens=0 is out of range"),
    ({"memoize_reads": "yes"}, "memoize_reads='yes' is out of range; accepted: true or false"),
    ({"budget": "prefill"}, "budget='prefill' is unknown; accepted: context, timeline"),
])
def test_bad_grid_configs_name_the_key(tmp_path, change, pattern):
    with pytest.raises(ValueError, match=pattern):
        gridspec.load_grid(cfg(tmp_path, **change))
    with pytest.raises(ValueError, match=r"missing grid key\(s\) \['out'\]"):
        gridspec.load_grid({k: v for k, v in BASE.items()})


def test_a_timeline_budget_is_its_own_grid_and_leaves_presses_room_for_the_question(tmp_path, tiny_llama):
    """budget: timeline names another grid (its cells never mix with context-budgeted ones); a press
    then keeps (T + reserve) / ratio − reserve context tokens, so that the cell's end holds 1/ratio."""
    assert gridspec.load_grid(cfg(tmp_path, budget="timeline")).config_hash != gridspec.load_grid(cfg(tmp_path)).config_hash
    assert gridspec.load_grid(cfg(tmp_path, budget="context")).config_hash == gridspec.load_grid(cfg(tmp_path)).config_hash
    method = {"method": "press", "press": "knorm", "ratio": 4}
    assert grid.build(method, tiny_llama, 400)[1].compression_ratio == pytest.approx(0.75)
    assert grid.build(method, tiny_llama, 400, reserve_tokens=40)[1].compression_ratio == pytest.approx(1 - 70 / 400)
    with pytest.warns(UserWarning, match="ratio=16 is out of reach for a press.*keeps 1 context token"):
        press = grid.build({**method, "ratio": 16}, tiny_llama, 400, reserve_tokens=40)[1]
    assert press.compression_ratio == pytest.approx(1 - 1 / 400)


@pytest.mark.parametrize("press", ["tova", "streaming_llm"])
def test_a_press_whose_budget_the_reserve_exceeds_keeps_one_context_token(tiny_llama, press):
    """At ratio 16 a 40-token reserve leaves a 400-token context no room: the press still runs, its
    cache holds the fewest tokens kvpress keeps, and its held bytes are what the row measures."""
    ctx = torch.randint(0, tiny_llama.config.vocab_size, (1, 400))
    with pytest.warns(UserWarning, match="out of reach"):
        filled, = grid.fan_out(tiny_llama, [{"method": "press", "press": press, "ratio": 16}], ctx, reserve_tokens=40)
    held = accounting.cache_report(filled.cache, tiny_llama.config, 400)
    kept = {layer.keys.shape[-2] for layer in filled.cache.layers}
    assert len(kept) == 1 and 1 <= kept.pop() <= 8
    assert held["ratio"] > 400 / 8


def test_methods_expand_as_a_product_with_dense_first(tmp_path):
    g = gridspec.load_grid(cfg(tmp_path, methods=[{"method": "xkv", "layer_group_size": [2, 5], "ratio": [4, 8]}]))
    assert g.methods[0] == {"method": "none"} and len(g.methods) == 5
    assert {(m["layer_group_size"], m["ratio"]) for m in g.methods[1:]} == {(2, 4), (2, 8), (5, 4), (5, 8)}
    assert g.max_new_tokens == {"niah_single_1": 4}  # one budget for every task
    assert gridspec.load_grid(cfg(tmp_path, max_new_tokens={"niah_single_1": 5})).max_new_tokens == {"niah_single_1": 5}


def test_corrupt_last_line_is_dropped_and_other_configs_refused(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"key": "a", "config_hash": "h"}) + "\n" + '{"key": "b", "conf')
    assert [r["key"] for r in results.read_rows(path, "h")] == ["a"]
    assert path.read_text().count("\n") == 1
    with pytest.raises(ValueError, match="written by another grid config"):
        results.read_rows(path, "other")
    path.write_text('{"key": "a"\n' + json.dumps({"key": "b"}) + "\n")
    with pytest.raises(ValueError, match="line 1 is corrupt"):
        results.read_rows(path)


def fake_rows(g, lengths):
    """Finished-looking rows of every cell of grid ``g`` at ``lengths`` (no model run)."""
    return [{"key": gridspec.cell_key(m, t, L, i), "config_hash": g.config_hash, "method": m, "task": t,
             "context_length": L, "index": i, "score": 100.0, "max_new_tokens": g.max_new_tokens[t]}
            for (t, L, i), m in gridspec.cells(g) if L in lengths]


def test_an_entrys_context_lengths_focus_its_methods_without_changing_their_cells(tmp_path):
    """A method entry with context_lengths runs only there; its cells keep the keys of the same method run
    everywhere, a method named by two entries runs at the union, and dense runs at every length."""
    entries = [{"method": "xkv", "layer_group_size": 2, "ratio": [3, 4], "context_lengths": [384]},
               {"method": "xkv", "layer_group_size": 2, "ratio": 4, "context_lengths": 512},
               {"method": "press", "press": "knorm", "ratio": 3}]
    g = gridspec.load_grid(cfg(tmp_path, context_lengths=[384, 512], methods=entries))
    everywhere = gridspec.load_grid(cfg(tmp_path, context_lengths=[384, 512], methods=[
        {"method": "xkv", "layer_group_size": 2, "ratio": [3, 4]}, {"method": "press", "press": "knorm", "ratio": 3}]))
    xkv3, xkv4 = ({"method": "xkv", "layer_group_size": 2, "ratio": r} for r in (3, 4))
    assert g.methods == everywhere.methods and all("context_lengths" not in m for m in g.methods)
    assert xkv3 in g.methods_at(384) and xkv3 not in g.methods_at(512) and xkv4 in g.methods_at(512)
    assert {"method": "none"} in g.methods_at(512)
    keys = {gridspec.cell_key(m, *u) for u, m in gridspec.cells(g)}
    assert keys == {gridspec.cell_key(m, *u) for u, m in gridspec.cells(everywhere) if not (u[1] == 512 and m == xkv3)}
    assert len(keys) == len(gridspec.cells(g)) == 2 * 4 + 2 * 3
    assert g.config_hash == everywhere.config_hash
    with pytest.raises(ValueError, match=r"methods\[0\].context_lengths=\[1024\] is out of range; accepted: a "
                                         r"non-empty subset of the grid's context_lengths \[384, 512\]"):
        gridspec.load_grid(cfg(tmp_path, context_lengths=[384, 512], methods=[{**entries[0], "context_lengths": [1024]}]))


def test_pinning_a_changed_default_keeps_earlier_rows_as_a_labelled_variant(tmp_path):
    """When the transform coder's default block scale changed, its earlier rows name the old value: they
    get new keys and labels, a grid naming the default runs its cells anew, other methods are untouched,
    and a sealed part is pinned the same way. A variant that becomes the default folds back into its cells."""
    methods = [{"method": "transform", "layer_group_size": 2, "ratio": 4}, {"method": "press", "press": "knorm", "ratio": 3}]
    config = cfg(tmp_path, methods=methods)
    g = gridspec.load_grid(config)
    rows = fake_rows(g, [384])
    for r in rows:
        r.update(paths={"gram transform int8": 2}, kv_ratio=4.0)
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.512.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert results.pin_method_field(tmp_path / "r.jsonl", "transform", "block_scale", "std") == 2
    assert results.pin_method_field(tmp_path / "r.jsonl", "transform", "block_scale", "std") == 0
    assert results.pin_method_field(tmp_path / "r.512.jsonl.gz", "transform", "block_scale", "std") == 2
    pinned = results.read_rows(tmp_path / "r.jsonl")
    assert [r["method"].get("block_scale") for r in pinned] == [None, "std", None] * 2
    assert [r["key"] for r in pinned if r["method"]["method"] != "transform"] == \
        [r["key"] for r in rows if r["method"]["method"] != "transform"]
    todo = {gridspec.cell_key(m, *u) for u, m in gridspec.cells(g)} - {r["key"] for r in pinned}
    assert len(todo) == 2 and all('"transform"' in k for k in todo)
    labels = set(results.load_results(tmp_path / "r.jsonl")["label"])
    assert "transform G2 4x pre_rope basis int8 sinks 4 window 32 std-scaled blocks q2 → gram" in labels
    pinned[0]["method"] = {**pinned[1]["method"], "block_scale": None}
    del pinned[0]["method"]["block_scale"]  # an unpinned row whose pinned twin exists
    pinned[0].update(task=pinned[1]["task"], index=pinned[1]["index"])
    (tmp_path / "c.jsonl").write_text(json.dumps(pinned[0]) + "\n" + json.dumps(pinned[1]) + "\n")
    with pytest.raises(ValueError, match="a rewritten row.s key is another row.s"):
        results.pin_method_field(tmp_path / "c.jsonl", "transform", "block_scale", "std")
    post_rope = lambda m: m.get("key_space", "pre_rope") == "post_rope"  # noqa: E731
    assert results.pin_method_field(tmp_path / "r.jsonl", "transform", "rope_tables", True, where=post_rope) == 0
    # a variant that becomes the default: its rows are the default's cells again, keyed as before pinning
    assert results.fold_into_default(tmp_path / "r.jsonl", "transform", {"block_scale": "std"}) == 2
    assert [r["key"] for r in results.read_rows(tmp_path / "r.jsonl")] == [r["key"] for r in rows]
    assert results.fold_into_default(tmp_path / "r.jsonl", "transform", {"block_scale": "std"}) == 0
    default = next(r for r in rows if r["method"]["method"] == "transform")
    variant = {**default, "method": {**default["method"], "block_scale": "std"}}
    variant["key"] = gridspec.cell_key(variant["method"], variant["task"], variant["context_length"], variant["index"])
    (tmp_path / "c.jsonl").write_text(json.dumps(default) + "\n" + json.dumps(variant) + "\n")
    with pytest.raises(ValueError, match="a rewritten row.s key is another row.s"):  # the default's cell exists
        results.fold_into_default(tmp_path / "c.jsonl", "transform", {"block_scale": "std"})


def test_dry_run_prints_the_cells_left_and_their_estimated_time(tmp_path, capsys):
    """--dry-run loads no model: it counts the cells left by length and method and estimates their time from
    finished cells (a method measured at one length is scaled to another by the length ratio)."""
    import yaml
    config = cfg(tmp_path, context_lengths=[384, 768], methods=[{"method": "press", "press": "knorm", "ratio": 3}])
    g = gridspec.load_grid(config)
    rows = [{**r, "cell_s": 2.0, "prefill_shared": True, "prefill_ms": 1000.0} for r in fake_rows(g, [384])]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(config))
    assert main(["eval", str(tmp_path / "g.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 768 tokens, twice 384's times: 2 samples × (dense 4 s + the sample's 2 s prefill, knorm 4 s) = 20 s
    assert "t: 4 of 8 cells done, 4 left, estimated 20 s" in out
    assert "| 768 | dense | 2 | 12 s |" in out and "| 768 | knorm 3x | 2 | 8 s |" in out and "| 384 |" not in out
    assert grid.cell_seconds({"prefill_shared": True, "prefill_ms": 900.0, "replay_ms": 100.0, "compress_ms": 400.0,
                              "decode_ms_per_token_memoized": 50.0, "new_tokens": 10}) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"minutes=-1 is out of range; accepted: >= 0"):
        grid.run(config, model=object(), tokenizer=None, minutes=-1)


def test_sealed_parts_are_read_by_resume_and_load_and_refused_when_unfinished(tmp_path, capsys):
    from kvsvd.__main__ import main
    config = cfg(tmp_path, context_lengths=[384, 512])
    g = gridspec.load_grid(config)
    out, part = tmp_path / "r.jsonl", tmp_path / "r.384.jsonl.gz"
    rows = fake_rows(g, [384]) + fake_rows(g, [512])[:-1]  # 512 lacks its last cell
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"context_length=512 has 1 unfinished cells"):
        results.seal(config, 512)
    with pytest.raises(ValueError, match=r"context_length=1024 is out of range; accepted: one of the grid's"):
        results.seal(config, 1024)
    (tmp_path / "r.rank1.jsonl").write_text("")
    with pytest.raises(ValueError, match="shards .* are not merged"):
        results.seal(config, 384)
    (tmp_path / "r.rank1.jsonl").unlink()
    import yaml
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(config))
    assert main(["seal", str(tmp_path / "g.yaml"), "384"]) == 0 and capsys.readouterr().out.strip() == str(part)
    assert [r["key"] for r in results.read_rows(part, g.config_hash)] == [r["key"] for r in rows[:6]]
    assert [r["context_length"] for r in results.read_rows(out)] == [512] * 5
    assert list(results.read_results(out)) == [r["key"] for r in rows]
    assert len(results.load_results(out)) == 11
    sealed = part.read_bytes()
    out.write_text(out.read_text() + json.dumps(fake_rows(g, [384])[0]) + "\n")  # killed between the two writes
    assert len(results.load_results(out)) == 11  # the duplicate counts once
    results.seal(config, 384)
    assert part.read_bytes() == sealed and len(results.read_rows(out)) == 5  # deterministic gzip, nothing lost
    with pytest.raises(ValueError, match="written by another grid config"):
        grid.run(cfg(tmp_path, context_lengths=[384, 512], seed=1), model=object(), tokenizer=None)
    out.write_text(out.read_text() + json.dumps(fake_rows(g, [512])[-1]) + "\n")
    before = out.read_text()
    grid.run(config, model=object(), tokenizer=None)  # every cell done across part and live file: no model call
    assert out.read_text() == before
    part.write_bytes(gzip.compress(b'{"key": "a"}\n{"key": '))
    with pytest.raises(ValueError, match="line 2 is corrupt"):
        results.read_results(out)


@pytest.mark.model
def test_grid_runs_resumes_and_loads_as_a_dataframe(smollm2, tmp_path, monkeypatch):
    model, tok = smollm2
    collects = []
    monkeypatch.setattr(grid.gc, "collect", lambda: collects.append(1) or 0)
    out = grid.run(cfg(tmp_path), model, tok)
    assert len(collects) == 2  # once per sample: the previous sample's cycles go before the next prefill
    monkeypatch.undo()
    rows = results.read_rows(out)
    assert len(rows) == 2 * 3 and rows[0]["method"] == {"method": "none"}
    for r in rows:
        assert set(r) >= {"prediction", "score", "gold_logprob", "agreement_with_dense", "prefill_ms", "compress_ms",
                          "decode_ms_per_token", "kv_bytes_dense16", "kv_bytes_held", "peak_rss_mb", "paths"}
        assert 0 <= r["score"] <= 100 and r["gold_logprob"] < 0
    xkv = [r for r in rows if r["method"]["method"] == "xkv"]
    assert all(r["kv_ratio"] > 1.5 and r["compression_breakdown_ms"] for r in xkv)
    assert all(sum(r["kv_bytes_by_kind"].values()) == r["kv_bytes_held"] for r in rows)
    assert {p for r in xkv for p in r["paths"]} <= {"gram bf16", "randomized q2 p8 bf16"}
    assert all(r["agreement_with_dense"] in (0.0, 1.0) for r in xkv)
    # each kvsvd row records the config it ran, its defaults resolved for this model and context
    assert all(CompressionConfig.of(**r["config"]).params.rank_k == r["rank_k"] > 0 for r in xkv)
    assert all("config" not in r for r in rows if r["method"]["method"] != "xkv")
    before = out.read_text()
    grid.run(cfg(tmp_path), model, tok)            # nothing left to do
    assert out.read_text() == before
    lines = before.splitlines(keepends=True)       # simulate a kill while writing the last cell
    out.write_text("".join(lines[:-1]) + lines[-1][:40])
    grid.run(cfg(tmp_path), model, tok)
    again = results.read_rows(out)
    assert [r["key"] for r in again] == [r["key"] for r in rows]
    # a torchrun run with another process count was interrupted: its shard counts as done, then is merged
    complete = out.read_text()
    lines = complete.splitlines(keepends=True)
    out.write_text("".join(lines[:3]))
    (tmp_path / "r.rank1.jsonl").write_text("".join(lines[3:]))
    grid.run(cfg(tmp_path), model, tok)
    assert out.read_text() == complete and not list(tmp_path.glob("r.rank*.jsonl"))
    df = results.load_results(out)
    xkv_label = f"xkv G2 3x pre_rope bf16 q2 → {df.loc[df['m_method'] == 'xkv', 'svd_ran'].iloc[0]}"
    assert len(df) == 6 and set(df["label"]) == {"dense", xkv_label, "knorm 3x"}
    grid.run(cfg(tmp_path, n_samples=3), model, tok)  # a grown grid runs only its new cells
    grown = out.read_text()
    assert grown.startswith(complete) and len(results.read_rows(out)) == 9
    assert all(r["max_new_tokens"] == 4 for r in results.read_rows(out))
    with pytest.raises(ValueError, match=r"max_new_tokens\[niah_single_1\]=5 but .* decoded with 4"):
        grid.run(cfg(tmp_path, max_new_tokens=5), model, tok)
    with pytest.raises(ValueError, match="another grid config"):
        grid.run(cfg(tmp_path, seed=1), model, tok)
    # a shrunk grid keeps the rows it no longer names when shards are merged
    lines = grown.splitlines(keepends=True)
    out.write_text("".join(lines[:6]))
    (tmp_path / "r.rank0.jsonl").write_text("".join(lines[6:]))
    grid.run(cfg(tmp_path, methods=BASE["methods"][:1]), model, tok)
    assert sorted(out.read_text().splitlines()) == sorted(grown.splitlines())
    # a sealed length is done for resuming: a grown grid runs only the new sample into the live file
    results.seal(cfg(tmp_path, n_samples=3), 384)
    assert out.read_text() == "" and len(results.load_results(out)) == 9
    grid.run(cfg(tmp_path, n_samples=4), model, tok)
    new = results.read_rows(out)
    assert [r["index"] for r in new] == [3] * 3 and len(results.load_results(out)) == 12
    assert all(r["agreement_with_dense"] in (0.0, 1.0) for r in new if r["method"]["method"] != "none")


@pytest.mark.model
def test_a_grid_run_in_pieces_by_minutes_writes_every_cell_exactly_once(smollm2, tmp_path, capsys):
    """minutes=0 stops after the first cell: piece after piece, each run writes one row, says what is left,
    and the pieces together hold every cell of the grid once, in the grid's order."""
    model, tok = smollm2
    config = cfg(tmp_path, context_lengths=[384, 512],
                 methods=[BASE["methods"][0] | {"context_lengths": [384]}, BASE["methods"][1]])
    g = gridspec.load_grid(config)
    named = [gridspec.cell_key(m, *u) for u, m in gridspec.cells(g)]
    assert len(named) == 2 * 3 + 2 * 2
    for piece in range(1, len(named) + 1):
        grid.run(config, model, tok, minutes=0)
        assert len(results.read_rows(tmp_path / "r.jsonl")) == piece
        assert f"1 cells done in this run, {len(named) - piece} left" in capsys.readouterr().out
    rows = results.read_rows(tmp_path / "r.jsonl")
    assert [r["key"] for r in rows] == named
    assert all(r["cell_s"] > 0 for r in rows)
    grid.run(config, model, tok, minutes=0)  # nothing left: no cell runs
    assert len(results.read_rows(tmp_path / "r.jsonl")) == len(named)
    assert "0 cells done in this run, 0 left" in capsys.readouterr().out


@pytest.mark.model
def test_torchrun_two_processes_give_the_same_rows(smollm2, tmp_path):
    model, tok = smollm2
    one = results.read_rows(grid.run(cfg(tmp_path, out=str(tmp_path / "one.jsonl")), model, tok))
    config = tmp_path / "two.yaml"
    import yaml
    config.write_text(yaml.safe_dump(cfg(tmp_path, out=str(tmp_path / "two.jsonl"))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                    "-m", "kvsvd", "eval", str(config)], check=True, env=env, capture_output=True, timeout=600)
    two = results.read_rows(tmp_path / "two.jsonl")
    assert [r["key"] for r in two] == [r["key"] for r in one]
    for a, b in zip(two, one):  # other thread counts change float reduction order: floats to 1e-3
        for k in set(a) - grid.TIMING_KEYS:
            expected = pytest.approx(b[k], rel=1e-3, abs=1e-3) if isinstance(b[k], float) else b[k]
            assert a[k] == expected, k
    assert not list(tmp_path.glob("two.rank*.jsonl"))


@pytest.mark.model
@pytest.mark.parametrize("press", ["pyramidkv", "observed_attention"])
def test_presses_with_per_layer_budgets_or_attention_weights_run(smollm2, press):
    model, tok = smollm2
    sample = grid.ruler.generate("niah_single_1", 1, 384, tok)[0]
    row = grid.run_cell(model, tok, sample, {"method": "press", "press": press, "ratio": 2}, "niah_single_1", 8)
    assert row["kv_ratio"] > 1.5 and row["gold_logprob"] < 0
    assert model.config._attn_implementation == "sdpa"  # eager only for the observed_attention cell


@pytest.mark.model
def test_quantized_and_dense16_cells_count_their_bytes_against_16_bit(smollm2):
    model, tok = smollm2
    sample = grid.ruler.generate("niah_single_1", 1, 512, tok)[0]
    row = grid.run_cell(model, tok, sample, {"method": "quantized", "nbits": 4, "residual_length": 32},
                        "niah_single_1", 8)
    assert row["paths"] == {"quanto int4": 60} and set(row["kv_bytes_by_kind"]) == {"codes", "scales", "residual"}
    assert row["kv_ratio"] == row["kv_bytes_dense16"] / row["kv_bytes_held"]
    dense16 = grid.run_cell(model, tok, sample, {"method": "dense16"}, "niah_single_1", 8)
    assert dense16["kv_ratio"] == 1.0 and dense16["paths"] == {"dense bf16": 60}
    assert dense16["kv_bytes_dense16"] == row["kv_bytes_dense16"] == 2 * 30 * 192 * 2 * row["processed_tokens"]


@pytest.mark.model
@pytest.mark.parametrize("press", ["snapkv", "expected_attention"])
def test_press_cells_answer_exactly_like_the_kvpress_pipeline(smollm2, press):
    """A press in the grid is kvpress's own press: same prompt split, same answer as its pipeline,
    also when the grid fills the cell from the sample's recorded prefill."""
    import kvpress
    from transformers import pipeline

    from kvsvd.evaluate import record_prefill, split_prompt
    model, tok = smollm2
    sample = grid.ruler.generate("niah_single_1", 1, 512, tok, seed=3)[0]
    prefill = record_prefill(model, split_prompt(tok, sample)[0])
    row = grid.run_cell(model, tok, sample, {"method": "press", "press": press, "ratio": 4}, "niah_single_1", 12,
                        prefill)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    answer = pipe(sample["context"], question=sample["question"], answer_prefix=sample["answer_prefix"].strip(),
                  press=getattr(kvpress, PRESSES[press])(compression_ratio=0.75), max_new_tokens=12)["answer"]
    assert row["prediction"].strip() == answer.strip()


@pytest.mark.model
def test_cells_filled_from_the_recorded_prefill_equal_cells_with_their_own_forward(smollm2):
    """Replaying the shared dense prefill (cache updates + press hooks) is the same computation."""
    from kvsvd.evaluate import record_prefill, split_prompt
    model, tok = smollm2
    sample = grid.ruler.generate("niah_single_2", 1, 384, tok, seed=5)[0]
    prefill = record_prefill(model, split_prompt(tok, sample)[0])
    recorded_keys = [keys.clone() for _, keys, _, _ in prefill.calls]
    methods = [{"method": "none"}, {"method": "xkv", "layer_group_size": 2, "ratio": 4, "key_space": "pre_rope"},
               {"method": "svd", "ratio": 4, "key_space": "post_rope"}, {"method": "minicache", "start_layer": 10},
               {"method": "quantized", "nbits": 2, "residual_length": 32}]
    methods += [{"method": "press", "press": p, "ratio": 4} for p in PRESSES if p != "observed_attention"]
    for method in methods:
        own = grid.run_cell(model, tok, sample, method, "niah_single_2", 4)
        shared = grid.run_cell(model, tok, sample, method, "niah_single_2", 4, prefill)
        assert shared["prefill_shared"] and not own["prefill_shared"] and shared["replay_ms"] > 0
        assert "replay_ms" not in own
        assert shared["prediction"] == own["prediction"], method
        assert shared["kv_bytes_held"] == own["kv_bytes_held"], method
        assert shared["gold_logprob"] == pytest.approx(own["gold_logprob"], abs=1e-3), method
    assert all(torch.equal(a, b) for a, b in zip(recorded_keys, (k for _, k, _, _ in prefill.calls)))  # untouched
    with pytest.raises(ValueError, match="needs its own forward"):
        grid.run_cell(model, tok, sample, {"method": "press", "press": "observed_attention", "ratio": 4},
                      "niah_single_2", 4, prefill)
    observed = [{"method": "press", "press": "observed_attention", "ratio": r} for r in (2, 4)]
    ctx = split_prompt(tok, sample)[0]
    for method, filled in zip(observed, grid.fan_out(model, observed, ctx)):  # one eager forward for both
        own = grid.run_cell(model, tok, sample, method, "niah_single_2", 4)
        fanned = grid.run_cell(model, tok, sample, method, "niah_single_2", 4, filled)
        assert fanned["prefill_shared"] and fanned["prediction"] == own["prediction"], method
        assert fanned["kv_bytes_held"] == own["kv_bytes_held"], method
        assert fanned["gold_logprob"] == pytest.approx(own["gold_logprob"], abs=1e-3), method
    with pytest.raises(ValueError, match="presses of one class"):
        grid.fan_out(model, [observed[0], {"method": "press", "press": "knorm", "ratio": 4}], ctx)


@pytest.mark.model
def test_memoized_reads_give_the_same_cells(smollm2):
    """A grid with memoize_reads answers exactly as one without; its rows say so and name their decode time."""
    model, tok = smollm2
    sample = grid.ruler.generate("niah_single_2", 1, 512, tok, seed=7)[0]
    for method in ({"method": "xkv", "layer_group_size": 5, "ratio": 4, "key_space": "pre_rope", "factor_dtype": "int8"},
                   {"method": "minicache", "start_layer": 10}):
        plain = grid.run_cell(model, tok, sample, method, "niah_single_2", 10)
        memo = grid.run_cell(model, tok, sample, method, "niah_single_2", 10, memoize_reads=True)
        assert memo["prediction"] == plain["prediction"] and memo["gold_logprob"] == plain["gold_logprob"], method
        assert memo["kv_bytes_held"] == plain["kv_bytes_held"] and memo["reads_memoized"]
        assert memo["kv_bytes_rebuilt"] > 0 and "reads_memoized" not in plain
        assert "decode_ms_per_token" not in memo and memo["decode_ms_per_token_memoized"] > 0


@pytest.mark.model
def test_grid_fills_a_samples_observed_attention_cells_from_one_forward(smollm2, tmp_path, monkeypatch):
    model, tok = smollm2
    calls = []
    monkeypatch.setattr(grid, "fan_out_prefill", lambda *a: calls.append(len(a[2])) or fan_out_prefill(*a))
    methods = [{"method": "press", "press": "observed_attention", "ratio": [2, 4]}]
    rows = results.read_rows(grid.run(cfg(tmp_path, methods=methods, n_samples=1), model, tok))
    assert calls == [2] and [r["method"].get("ratio") for r in rows] == [None, 2, 4]  # cells as run_cell's: see above
    assert all(r["prefill_shared"] and r["kv_ratio"] > 1.5 for r in rows[1:])


@pytest.mark.core
def test_a_grid_naming_peers_that_are_not_installed_names_the_extra(tmp_path, monkeypatch, capsys):
    """Without the peers extra a grid that names a press or a quantised cache stops before any model
    loads, naming the methods, the packages, the extra and kvpress's transformers range."""
    real = grid.importlib.util.find_spec

    def find_spec(name, *args):
        if name == "optimum.quanto":
            raise ModuleNotFoundError("No module named 'optimum'")
        return None if name == "kvpress" else real(name, *args)

    monkeypatch.setattr(grid.importlib.util, "find_spec", find_spec)
    methods = [{"method": "xkv", "layer_group_size": 2, "ratio": 3}, {"method": "press", "press": "tova", "ratio": 4},
               {"method": "quantized", "nbits": 4}]
    with pytest.raises(grid.PeersMissing, match=r"\['tova 4x', 'quantized quanto int4'\] need kvpress, "
                                                r"optimum.quanto, from kvsvd's 'peers' extra.*transformers>=4.56,<5.3"):
        grid.run(cfg(tmp_path, methods=methods), model=object(), tokenizer=None)
    assert not (tmp_path / "r.jsonl").exists()
    config = tmp_path / "g.yaml"
    config.write_text(json.dumps(cfg(tmp_path, methods=methods)))  # JSON is YAML
    assert main(["eval", str(config)]) == 2                       # the CLI says it in one line, exit status 2
    assert "from kvsvd's 'peers' extra" in capsys.readouterr().err
    grid.require_peers([{"method": "xkv", "ratio": 3}, {"method": "none"}])  # kvsvd's own methods need no peer
