"""Notebook 05's interactive planner in a real browser: JupyterLab started headless on a free loopback port, the
system's Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium; no browser is downloaded) opens a
copy of notebook 05, runs its cells, sees the planner widget rendered, changes its cache mode and sees the verdict
change. A screenshot is kept in tests/artifacts/ (git-ignored). Without Chromium the test skips with one line."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "05_plan_your_gpu.ipynb"
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
#: flags for a quiet, private, offline-friendly headless Chromium
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1400,1800"]
TOKEN = "exl2-course-browser-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, seconds: float, proc: subprocess.Popen) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer at {url} within {seconds:.0f} s")


@pytest.fixture()
def lab(tmp_path):
    if not CHROMIUM or not DRIVER:
        pytest.skip("Chromium not found: apt-get install -y chromium chromium-driver (Debian) to run the browser test")
    pytest.importorskip("selenium", reason="selenium is not installed: pip install -r requirements.txt")
    pytest.importorskip("ipywidgets", reason="ipywidgets is not installed: pip install -r requirements.txt")
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)  # a copy: the browser's autosave never touches the repo's notebook
    port = _free_port()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws")}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--port-retries=0", f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={TOKEN}",
           "--expose-app-in-browser", "--LabApp.news_url=", "--LabApp.extension_manager=readonly",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers run as root
        cmd.append("--allow-root")
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/status?token={TOKEN}", 90, proc)
        yield f"http://127.0.0.1:{port}", tmp_path
    finally:
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)  # JupyterLab asks for confirmation; a second ^C shuts it down with kernels
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def test_planner_widget_renders_and_reacts_in_chromium(lab):
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, tmp = lab
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp / 'profile'}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        driver.get(f"{base}/lab/tree/{NOTEBOOK.name}?token={TOKEN}")
        wait = WebDriverWait(driver, 120, poll_frequency=0.5)
        wait.until(lambda d: d.execute_script(  # the notebook panel is open and its kernel idle
            "const a = window.jupyterapp; if (!a) return false;"
            "const w = Array.from(a.shell.widgets('main')).find(x => x.sessionContext);"
            "if (!w) return false; a.shell.activateById(w.id); const s = w.sessionContext.session;"
            "return !!(s && s.kernel && s.kernel.status === 'idle');"))
        # the stored outputs go first, so what is found below is the live widget of this run
        driver.execute_script("return window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs');")
        assert not driver.find_elements(By.CSS_SELECTOR, ".exl2-planner")
        driver.execute_script("return window.jupyterapp.commands.execute('notebook:run-all-cells');")
        stale = (StaleElementReferenceException, NoSuchElementException)

        def shown(css: str) -> list[str]:  # read afresh each time: a widget update replaces its elements
            return [el.text for el in driver.find_elements(By.CSS_SELECTOR, css)]

        def planner_into_view() -> None:
            driver.execute_script("document.querySelector('.exl2-planner').scrollIntoView({block: 'start'});")

        verdict = ".exl2-planner .pl-verdict"
        WebDriverWait(driver, 240, poll_frequency=1, ignored_exceptions=stale).until(
            lambda d: any("DOES NOT FIT" in v for v in shown(verdict)))
        assert driver.find_elements(By.CSS_SELECTOR, ".exl2-planner .pl-bar[data-fits='false']")
        planner_into_view()
        driver.save_screenshot(str(ARTIFACTS / "browser_planner_fp16.png"))
        WebDriverWait(driver, 30, ignored_exceptions=stale).until(lambda d: _select_cache(d, "q8"))
        # fp16 -> q8: the planner says 32k tokens then fit on this card
        WebDriverWait(driver, 60, poll_frequency=0.5, ignored_exceptions=stale).until(
            lambda d: any("FITS with" in v for v in shown(verdict))
            and d.find_elements(By.CSS_SELECTOR, ".exl2-planner .pl-bar[data-fits='true']"))
        planner_into_view()
        driver.save_screenshot(str(ARTIFACTS / "browser_planner.png"))
        assert (ARTIFACTS / "browser_planner.png").stat().st_size > 10_000
    finally:
        driver.quit()


def _select_cache(driver, mode: str) -> bool:
    """Choose ``mode`` in the planner's cache-mode dropdown (its only single-choice <select>)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    boxes = [s for s in driver.find_elements(By.CSS_SELECTOR, ".exl2-planner select")
             if not s.get_attribute("multiple")]
    if not boxes:
        return False
    Select(boxes[0]).select_by_visible_text(mode)
    return True
