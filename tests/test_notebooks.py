"""The four notebooks: stored without outputs, executed under papermill with profile="smoke",
and every figure redrawn from their saved results alone (`make figures`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebooks need kvsvd's workbook extra")

from kvsvd import figures  # noqa: E402  (after the skip: the workbook extra may be absent)
from kvsvd.__main__ import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def test_four_numbered_notebooks_stored_without_outputs():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"]
    for path in NOTEBOOKS:
        assert all("id" in c for c in json.loads(path.read_text())["cells"]), f"{path.name}: a cell has no id"
        book = nbformat.read(path, as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert all(c.outputs == [] and c.execution_count is None for c in code), f"{path.name} has outputs"
        params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, f"{path.name} needs one cell tagged 'parameters'"
        for name in ("profile", "results_dir", "interactive", "rank", "n_iter"):
            assert f"{name} =" in params[0].source, f"{path.name}: parameter {name} missing"
        assert any("controls(" in c.source for c in code), f"{path.name} has no widget controls"
        # an interactive run writes to the git-ignored scratch folder; make reproduce passes results_dir
        assert "results_dir = None" in params[0].source, f"{path.name}: results_dir must default to None"
        assert any(f'workbook.results_folder("{path.stem}", profile, results_dir)' in c.source for c in code)
        assert book.metadata.kernelspec.name == "python3"  # named, so JupyterLab starts it without asking


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> tuple[Path, Path]:
    """Run every notebook once with profile="smoke"; returns (results folder, executed folder)."""
    import papermill as pm
    results = tmp_path_factory.mktemp("results")
    executed = tmp_path_factory.mktemp("executed")
    for path in NOTEBOOKS:
        pm.execute_notebook(str(path), str(executed / path.name), kernel_name="python3", cwd=str(path.parent),
                            parameters={"profile": "smoke", "results_dir": str(results), "interactive": False},
                            progress_bar=False)
    return results, executed


@pytest.mark.model
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_under_smoke_profile(path, smoke_results):
    results, executed = smoke_results
    book = nbformat.read(executed / path.name, as_version=4)
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "Traceback" not in stderr and "Warning" not in stderr, stderr[:2000]
    mine = [n for n in figures.FIGURES if n.startswith(path.stem[:2])]
    assert mine, f"no figures registered for {path.name}"
    captions = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    for name in mine:  # saved as PNG and SVG, and its caption shown in the notebook
        assert (results / "figures" / f"{name}.png").stat().st_size > 0
        assert (results / "figures" / f"{name}.svg").stat().st_size > 0
        assert any(f"Figure {name}." in c for c in captions), f"caption of {name} not shown"


@pytest.mark.model
def test_the_notebooks_save_every_figures_inputs(smoke_results):
    """`make figures` needs nothing but what the notebooks saved (drawing from saved files alone is
    tested on the committed results in test_compat)."""
    assert sorted(figures.available(smoke_results[0])) == sorted(figures.FIGURES)


def test_make_figures_draws_what_the_saved_results_allow(tmp_path):
    saved = tmp_path / "results"
    (saved / "analysis").mkdir(parents=True)
    shutil.copy(ROOT / "results/analysis/spectra.csv", saved / "analysis")
    if (ROOT / ".venv" / ".installed").exists() and Path(sys.executable).is_relative_to(ROOT / ".venv"):
        subprocess.run(["make", "-s", "figures", f"RESULTS={saved}"], cwd=ROOT, check=True, capture_output=True)
    else:
        assert main(["figures", "--results", str(saved)]) == 0
    drawn = sorted(p.stem for p in (saved / "figures").glob("*.png"))
    assert drawn == sorted(figures.available(saved)) and "01_spectra" in drawn


def test_figures_without_results_say_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to draw"):
        figures.redraw_all(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"needs \['analysis/spectra.csv'\]"):
        figures.draw("01_spectra", tmp_path)
    with pytest.raises(ValueError, match="figure='99_none' is unknown"):
        figures.draw("99_none", tmp_path)
