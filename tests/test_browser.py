"""Notebook 01 run through JupyterLab in a real browser, as a workshop attendee would run it.

JupyterLab starts from this environment on 127.0.0.1 with a token; headless Chromium (the system's
`chromium`, driven by Playwright) opens the notebook, runs all cells from the Run menu, waits for the
last one, and saves it. The test then reads what the browser showed and what it saved: no cell failed,
the tool prompt and a transcript are on the page. A screenshot goes to the run's folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fclib.runs import PROJECT_ROOT, run_folder

NOTEBOOK = "01_define_tools.ipynb"
HOW_TO_ENABLE = "no Chromium: install Debian's `chromium` package (apt-get install chromium) to run the browser test"
ERROR_OUTPUT = '[data-mime-type="application/vnd.jupyter.error"]'


def chromium() -> str | None:
    """The system's Chromium: Debian's binary itself (its /usr/bin/chromium is a shell wrapper), else on PATH."""
    if os.access("/usr/lib/chromium/chromium", os.X_OK):
        return "/usr/lib/chromium/chromium"
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


def code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_until(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)


def wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer {url} within {timeout:.0f} s")


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on 127.0.0.1 over a copy of notebook 01, stopped by its PID afterwards."""
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(PROJECT_ROOT / "notebooks" / NOTEBOOK, root / NOTEBOOK)
    port, token = free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "FCLIB_NOTEBOOK_PROFILE": "smoke",  # the notebook's own switch to the fast profile (as under nbval)
        "HF_HUB_OFFLINE": "1",
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),  # nothing of the user's Jupyter settings
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
    }
    # render every cell (JupyterLab 4 renders only the visible ones by default), so the page holds all outputs
    tracker = tmp_path / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    log = (tmp_path / "jupyterlab.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--ServerApp.port_retries=0",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            *(["--allow-root"] * (os.geteuid() == 0)),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", proc)
        yield {"url": f"http://127.0.0.1:{port}", "token": token, "root": root, "log": tmp_path / "jupyterlab.log"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.mark.slow
def test_notebook_01_runs_in_jupyterlab_in_a_real_browser(jupyterlab):
    browser_path = chromium()
    if browser_path is None:
        pytest.skip(HOW_TO_ENABLE)
    from playwright.sync_api import sync_playwright

    lab = jupyterlab
    sessions = f"{lab['url']}/api/sessions?token={lab['token']}"
    saved = lab["root"] / NOTEBOOK
    shots = run_folder("smoke") / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{lab['url']}/lab/tree/{NOTEBOOK}?token={lab['token']}")
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
            # the notebook asks for the `fclib` kernel: it starts without a kernel-choice dialog
            wait_until(
                lambda: any(x["kernel"]["execution_state"] == "idle" for x in get_json(sessions)),
                "the notebook's kernel to start",
                120,
            )
            kernels = [x["kernel"]["name"] for x in get_json(sessions)]
            assert page.locator(".jp-Dialog").count() == 0, "JupyterLab asked which kernel to use"
            page.locator(".lm-MenuBar-item", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel").get_by_text("Run All Cells", exact=True).click()
            # every code cell gets an execution count, none stays queued or running ([*])
            page.wait_for_function(
                """() => {
                    const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
                    return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
                }""",
                timeout=480_000,
            )
            page.locator(".jp-CodeCell").last.scroll_into_view_if_needed()  # the student's transcripts
            page.screenshot(path=str(shots / "01_define_tools.png"))
            text = page.locator(".jp-NotebookPanel").inner_text()
            errors = page.locator(ERROR_OUTPUT).count()
            page.locator(".jp-NotebookPanel .jp-Notebook").click()
            page.keyboard.press("Control+s")
            wait_until(
                lambda: all(c.get("execution_count") for c in code_cells(saved)), "the browser to save the notebook", 60
            )
        finally:
            browser.close()

    assert errors == 0, f"{errors} cell(s) showed an error in the browser"
    assert "You solve grade-school math word problems by calling arithmetic functions" in text  # the tool prompt
    assert "final_answer(value=" in text and "=> correct" in text  # a transcript, with its outcome
    assert (shots / "01_define_tools.png").stat().st_size > 10_000
    assert kernels == ["fclib"]
    # what the browser saved: every code cell ran, in order, and none failed
    cells = code_cells(saved)
    assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1))
    assert not [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
