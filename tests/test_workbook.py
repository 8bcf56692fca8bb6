"""Where the notebooks write (scratch by default, never over a larger profile's results), how they
are saved from JupyterLab (without outputs), and what the explore widgets draw."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import pytest
import torch

from kvsvd import lab, workbook

matplotlib.use("Agg")
NB = "01_spectrum_analysis"


def _committed(tmp_path: Path, profile: str) -> Path:
    committed = tmp_path / "results"
    (committed / "analysis").mkdir(parents=True)
    (committed / "analysis/spectra.csv").write_text("made by the committed run\n")
    (committed / "figures").mkdir()
    (committed / "figures/01_spectra.png").write_bytes(b"png")
    (committed / workbook.MANIFEST).write_text(json.dumps(dict.fromkeys(workbook.OUTPUTS[NB], profile)))
    return committed


def test_every_notebook_declares_its_outputs():
    assert set(workbook.OUTPUTS) == set(workbook.SETTINGS)
    assert set(workbook.PROFILE_SIZE) == {p for s in workbook.SETTINGS.values() for p in s}


def test_default_folder_is_a_scratch_copy_of_the_same_profile(tmp_path):
    committed = _committed(tmp_path, "cpu")
    out = workbook.results_folder(NB, "cpu", committed=committed)
    assert out == committed / "interactive" / "cpu"
    assert (out / "analysis/spectra.csv").read_text() == "made by the committed run\n"  # reused, not recomputed
    (out / "analysis/spectra.csv").write_text("interactive\n")
    assert (committed / "analysis/spectra.csv").read_text() == "made by the committed run\n"
    assert workbook.results_folder(NB, "cpu", committed=committed) == out  # a second run keeps its own files
    assert (out / "analysis/spectra.csv").read_text() == "interactive\n"
    smoke = workbook.results_folder(NB, "smoke", committed=committed)  # another profile: its own empty folder
    assert smoke == committed / "interactive" / "smoke" and not (smoke / "analysis/spectra.csv").exists()
    assert json.loads((smoke / workbook.MANIFEST).read_text())["analysis/spectra.csv"] == "smoke"


def test_a_smaller_profile_refuses_to_replace_results_of_a_larger_one(tmp_path):
    committed = _committed(tmp_path, "cpu")
    with pytest.raises(FileExistsError, match=r"profile='smoke' would replace results made with profile 'cpu'.*"
                                              r"analysis/spectra\.csv.*figures/01_spectra\.png"):
        workbook.results_folder(NB, "smoke", results_dir=committed)
    manifest = json.loads((committed / workbook.MANIFEST).read_text())
    assert set(manifest.values()) == {"cpu"}  # the refusal recorded nothing
    assert workbook.results_folder(NB, "gpu", results_dir=committed) == committed  # a larger profile may replace
    assert json.loads((committed / workbook.MANIFEST).read_text())["figures/01_*"] == "gpu"
    other = workbook.results_folder("02_kernel_derivation_and_stability", "smoke", results_dir=tmp_path / "fresh")
    assert (other / "analysis").is_dir()
    with pytest.raises(ValueError, match="profile='tpu' is unknown"):
        workbook.results_folder(NB, "tpu")


def test_notebooks_started_side_by_side_record_every_output_in_one_manifest(tmp_path):
    """The manifest is read, checked and written under a lock: four notebooks starting at once on one folder (as
    the notebook tests run them), twenty times over, lose no entry."""
    for i in range(20):
        out = tmp_path / str(i)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(workbook.results_folder, workbook.OUTPUTS, ["smoke"] * 4, [out] * 4))
        manifest = json.loads((out / workbook.MANIFEST).read_text())
        assert manifest == dict.fromkeys([p for ps in workbook.OUTPUTS.values() for p in ps], "smoke")


def test_the_committed_results_record_their_profile():
    manifest = json.loads((Path(__file__).resolve().parents[1] / "results" / workbook.MANIFEST).read_text())
    assert set(manifest) == {p for ps in workbook.OUTPUTS.values() for p in ps}
    assert set(manifest.values()) == {"cpu"}


def _executed_notebook() -> dict:
    return {"nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
                         "language_info": {"name": "python", "version": "3.11.7", "mimetype": "text/x-python"},
                         "widgets": {"application/vnd.jupyter.widget-state+json": {"state": {}}}},
            "cells": [{"id": "a", "cell_type": "code", "source": "x = 1  # edited", "execution_count": 3,
                       "metadata": {"tags": ["parameters"], "scrolled": True, "execution": {"t": 1}},
                       "outputs": [{"output_type": "stream", "name": "stdout", "text": "1"}]},
                      {"id": "b", "cell_type": "markdown", "source": "# title", "metadata": {}}]}


def test_saving_from_jupyterlab_strips_what_a_run_adds():
    nb = lab.strip(_executed_notebook())
    assert nb["metadata"] == {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                             "language": "python"}, "language_info": {"name": "python"}}
    code, markdown = nb["cells"]
    assert code["outputs"] == [] and code["execution_count"] is None and code["metadata"] == {"tags": ["parameters"]}
    assert code["source"] == "x = 1  # edited" and markdown["source"] == "# title"  # edits are saved


def test_pre_save_hook_touches_only_the_workbook_notebooks(tmp_path):
    manager = SimpleNamespace(_get_os_path=lambda path: str(Path(path)))
    mine = {"type": "notebook", "content": _executed_notebook()}
    lab.strip_outputs(mine, str(lab.NOTEBOOKS / "01_spectrum_analysis.ipynb"), manager)
    assert mine["content"]["cells"][0]["outputs"] == []
    theirs = {"type": "notebook", "content": _executed_notebook()}
    lab.strip_outputs(theirs, str(tmp_path / "mine.ipynb"), manager)
    assert theirs["content"] == _executed_notebook()
    lab.strip_outputs({"type": "file", "content": "text"}, str(lab.NOTEBOOKS / "notes.txt"), manager)


def test_repository_server_config_names_the_hook():
    config = json.loads((Path(__file__).resolve().parents[1] / "jupyter_server_config.json").read_text())
    assert config["FileContentsManager"]["pre_save_hook"] == "kvsvd.lab.strip_outputs"
    from traitlets.utils.importstring import import_item
    assert import_item(config["FileContentsManager"]["pre_save_hook"]) is lab.strip_outputs


def test_explore_rsvd_warms_up_once_and_keeps_the_legend_off_the_data(monkeypatch):
    import matplotlib.pyplot as plt
    calls = []
    real = workbook.get_svd

    def counting(method):
        fn = real(method)
        return lambda *a, **k: (calls.append(method), fn(*a, **k))[1]
    monkeypatch.setattr(workbook, "get_svd", counting)
    monkeypatch.setattr(workbook, "_WARMED", set())
    monkeypatch.setattr(plt, "show", lambda: None)
    A = torch.randn(256, 48, generator=torch.Generator().manual_seed(0))
    workbook.explore_rsvd(A, rank=8, n_iter=1, method="rsvd")
    assert len(calls) == 2  # one untimed warm-up call, then the timed one
    fig = plt.gcf()
    ax = fig.axes[0]
    assert "after a warm-up call" in ax.get_title()
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes.x1  # beside the axes, so it covers no data
    workbook.explore_rsvd(A, rank=12, n_iter=1, method="rsvd")
    assert len(calls) == 3  # the same matrix and method: no second warm-up
    plt.close("all")
