"""JupyterLab glue: the numbered notebooks are saved as they are stored, without outputs.

``strip_outputs`` is a Jupyter Server ``pre_save_hook`` (``jupyter_server_config.json`` in the
repository root names it; ``make lab`` starts JupyterLab with it). When JupyterLab saves or
autosaves a notebook in the repository's ``notebooks/`` folder, it drops outputs, execution
counts, widget state and the kernel's ``language_info`` before the file is written, so a user who
runs the notebooks and plays with the widgets leaves ``git status`` clean. A source edit is still
saved. Notebooks elsewhere are saved untouched.
"""

from __future__ import annotations

from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_METADATA = ("tags",)  # the cell metadata the stored notebooks carry (papermill's "parameters" tag)


def strip(nb: dict) -> dict:
    """The notebook JSON ``nb`` (nbformat 4, as a dict) as stored: no outputs, no execution counts,
    no widget state; in place, and returned."""
    meta = nb.setdefault("metadata", {})
    meta.pop("widgets", None)
    meta["language_info"] = {"name": meta.get("language_info", {}).get("name", "python")}
    for cell in nb.get("cells", []):
        cell["metadata"] = {k: v for k, v in cell.get("metadata", {}).items() if k in CELL_METADATA}
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    return nb


def strip_outputs(model: dict, path: str, contents_manager, **kwargs) -> None:
    """Jupyter Server pre-save hook: strip a notebook of ``NOTEBOOKS`` before it is written."""
    if model.get("type") != "notebook" or not model.get("content"):
        return
    os_path = Path(contents_manager._get_os_path(path)).resolve()
    if os_path.parent == NOTEBOOKS:
        strip(model["content"])
