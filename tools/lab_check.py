"""`make lab-check`: every numbered notebook in JupyterLab, driven in a real headless Chromium.

The working tree (tracked and untracked, not ignored files) is copied into a scratch git
repository whose notebooks use the smoke profile. JupyterLab starts there on a loopback port with
the repository's server config (``jupyter_server_config.json``). For each notebook the check
opens it, asserts that no kernel dialog appears, runs every cell, asserts that no cell shows an
error, that each figure caption appears once and that every widget label shows in full, moves one
slider and one dropdown of the last explore cell and asserts that its output changed, saves the
notebook, and takes a screenshot. At the end ``git status`` of the scratch copy must be clean (the
notebooks saved without outputs, every result written to the git-ignored interactive folder), and
the server it started is stopped.

Usage: python tools/lab_check.py [--out DIR] [--chromium /usr/bin/chromium] [--timeout 900]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
# JupyterLab settings: every cell stays in the DOM (no windowing), so the check sees all outputs.
LAB_SETTINGS = {"@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"}}


def scratch_copy(dest: Path) -> Path:
    """The working tree as a fresh git repository in ``dest``, with every notebook's profile set to smoke."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for path in (dest / "notebooks").glob("[0-9]*.ipynb"):
        text = path.read_text()
        smoke = re.sub(r'profile = \\"cpu\\"', r'profile = \\"smoke\\"', text, count=1)
        if smoke == text:
            raise RuntimeError(f"{path.name}: no `profile = \"cpu\"` line in its parameters cell")
        path.write_text(smoke)
    git = ["git", "-c", "user.name=lab-check", "-c", "user.email=lab-check@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "scratch copy"], cwd=dest, check=True)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(repo: Path, settings: Path, port: int, token: str, log: Path) -> subprocess.Popen:
    for name, value in LAB_SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(value))
    home = settings.parent / "jupyter"  # a first start, as on a fresh machine: no runtime, data or workspace state
    env = {**os.environ, "PYTHONPATH": str(repo), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={token}", "--LabApp.expose_app_in_browser=True",
           f"--ServerApp.root_dir={repo / 'notebooks'}",
           f"--config={repo / 'jupyter_server_config.json'}", *(["--allow-root"] if os.geteuid() == 0 else [])]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({proc.returncode}); see {log}") from None
            time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"JupyterLab did not answer on port {port} within 120 s; see {log}")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def check_notebook(page, lab_url: str, name: str, shots: Path, timeout: float) -> dict:
    """Open one notebook from JupyterLab's file browser, as a user does, run it and play with its
    widgets; returns what was seen. Raises AssertionError on a failure."""
    page.goto(lab_url)
    page.locator(".jp-DirListing-item", has_text=name).first.dblclick(timeout=60_000)
    nb = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")  # the open notebook's tab
    nb.locator(".jp-Notebook .jp-Cell").first.wait_for(state="attached", timeout=60_000)
    kernel = f"""() => {{ const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
        const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
        return !!k && k.status === 'idle' && w.context.path.endsWith('{name}.ipynb'); }}"""
    wait_for(lambda: page.evaluate(kernel), 120, f"{name}: its kernel started and idle")  # Run All before that races
    dialogs = page.locator(".jp-Dialog").all_inner_texts()
    assert not dialogs, f"{name}: a dialog opened with the notebook: {dialogs}"
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()

    executed = """() => { const w = window.jupyterapp.shell.currentWidget;
        const code = w.content.widgets.filter(c => c.model.type === 'code');
        return w.sessionContext.session.kernel.status === 'idle' && code.every(c => c.model.executionCount !== null); }"""

    def done() -> bool:
        return page.evaluate(executed)
    t0 = time.monotonic()
    wait_for(done, timeout, f"{name}: every cell executed")
    run_s = time.monotonic() - t0
    errors = [t for t in nb.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
              .all_inner_texts() if re.search(r"Traceback|Error|Warning", t)]
    assert not errors, f"{name}: a cell shows an error: {errors[0][:1500]}"
    captions = re.findall(r"Figure (\d\d_\w+)\.", " ".join(
        nb.locator(".jp-OutputArea-output.jp-RenderedMarkdown, .jp-OutputArea-output .jp-RenderedMarkdown")
        .all_inner_texts()))
    repeated = sorted({c for c in captions if captions.count(c) > 1})
    assert captions and not repeated, f"{name}: captions shown more than once: {repeated} (all: {captions})"
    cells = nb.locator(".jp-CodeCell").filter(has=page.locator(".widget-slider, .widget-dropdown"))
    assert cells.count() > 0, f"{name}: no explore cell shows widgets"
    cell = cells.last
    cut = cell.locator(".widget-label").evaluate_all(
        "els => els.filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)")
    assert not cut, f"{name}: widget labels cut off: {cut}"

    def output() -> str:
        return cell.locator(".widget-output").inner_html()
    changed = []
    slider = cell.locator(".widget-slider .noUi-handle, .widget-slider .slider-handle").first
    if slider.count():
        before = output()
        slider.focus()
        slider.press("ArrowRight")
        wait_for(lambda: output() != before and "jp-OutputArea-output" in output(), timeout, f"{name}: slider redraw")
        changed.append("slider")
    dropdown = cell.locator(".widget-dropdown select").first
    if dropdown.count():
        before = output()
        options = dropdown.locator("option").all_inner_texts()
        current = dropdown.evaluate("e => e.options[e.selectedIndex].text")
        dropdown.select_option(label=next(o for o in options if o != current))
        wait_for(lambda: output() != before and "jp-OutputArea-output" in output(), timeout,
                 f"{name}: dropdown redraw")
        changed.append("dropdown")
    assert changed, f"{name}: the explore cell has neither a slider nor a dropdown"
    wait_for(done, timeout, f"{name}: idle after the widget changes")
    errors = [t for t in cell.locator(".widget-output").all_inner_texts() if "Traceback" in t or "Error" in t]
    assert not errors, f"{name}: the explore cell shows an error after a change: {errors[0][:1500]}"
    cell.scroll_into_view_if_needed()
    cell.screenshot(path=str(shots / f"{name}_explore.png"))
    page.screenshot(path=str(shots / f"{name}.png"))
    page.keyboard.press("Control+s")
    time.sleep(2)
    return {"notebook": name, "run_all_s": round(run_s, 1), "changed": changed, "captions": len(captions)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for one notebook's Run All")
    args = ap.parse_args(argv)
    from playwright.sync_api import Error as PlaywrightError, sync_playwright
    out = args.out or Path(tempfile.mkdtemp(prefix="kvsvd-lab-check-"))
    repo, shots = out / "repo", out / "screenshots"
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    shots.mkdir(parents=True, exist_ok=True)
    scratch_copy(repo)
    port, token = free_port(), secrets.token_hex(16)
    lab = start_lab(repo, out / "lab-settings", port, token, out / "jupyterlab.log")
    seen, failures = [], []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for path in sorted((repo / "notebooks").glob("[0-9]*.ipynb")):
                try:
                    seen.append(check_notebook(page, f"http://127.0.0.1:{port}/lab?token={token}", path.stem, shots,
                                               args.timeout))
                    print(f"ok   {seen[-1]}", flush=True)
                except (AssertionError, PlaywrightError) as err:
                    failures.append(str(err))
                    page.screenshot(path=str(shots / f"{path.stem}_failed.png"))
                    print(f"FAIL {err}", flush=True)
            browser.close()
    finally:
        lab.terminate()
        lab.wait(timeout=30)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    if status.strip():
        failures.append(f"git status of the scratch copy is not clean after the run:\n{status}")
    print(f"screenshots: {shots}")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
