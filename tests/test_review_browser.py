"""xr-review in a real browser: Playwright drives Debian's chromium over a real daemon's results.

Skipped, with the reason, where chromium or Playwright is missing (`make test` installs both where it can).
Screenshots of the queue and a case are written to $XR_SCREENSHOTS (default: the test's tmp folder)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def browser():  # per test: Playwright's thread ends with it (the leaked-thread guard checks)
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install chromium): the browser test needs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright not installed (pip install playwright)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        yield b
        b.close()


@pytest.fixture()
def served(tmp_path, tiny_model_dir, xray_paths):
    """Four flagged films scored by the real daemon (with their heatmaps), and xr-review serving them."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "calibration_threshold.json").write_text(json.dumps({"T": 1.5, "threshold": 0.001}))
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for p in xray_paths[:2] + xray_paths[-2:]:
        shutil.copy(p, inbox / p.name)
        os.utime(inbox / p.name, (1, 1))
    bin_ = Path(sys.executable).parent
    daemon = subprocess.run(
        [
            bin_ / "xr-daemon",
            "--watch",
            inbox,
            "--output",
            out,
            "--model",
            model / "xr_mvp_best.pt",
            "--once",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert daemon.returncode == 0, daemon.stderr[-2000:]
    port = _free_port()
    server = subprocess.Popen(
        [bin_ / "xr-review", "--output", out, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    yield url
    server.terminate()
    server.wait(30)


def test_a_reader_opens_the_queue_a_case_sees_the_heatmap_and_dismisses_it(browser, served, tmp_path):
    shots = Path(os.environ.get("XR_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.goto(served + "/")
    rows = page.locator("table.queue tbody tr")
    assert rows.count() == 4
    page.wait_for_function(
        "[...document.querySelectorAll('td.thumb img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    page.screenshot(path=str(shots / "queue.png"), full_page=True)
    page.locator("a.case-link").first.click()
    page.wait_for_selector("#heatmap")
    page.wait_for_function(
        "document.querySelector('#heatmap').complete && document.querySelector('#heatmap').naturalWidth > 0"
    )
    page.wait_for_function(
        "document.querySelector('#film').complete && document.querySelector('#film').naturalWidth > 0"
    )
    assert page.locator("#heatmap").evaluate("i => i.naturalWidth") >= 256
    page.screenshot(path=str(shots / "case.png"), full_page=True)
    page.fill("input[name=reviewer]", "Dr. Test")
    page.click("button.dismiss")
    page.wait_for_url(served + "/")
    assert page.locator("table.queue tbody tr").count() == 3
    assert "1 review recorded" in page.content()
    page.close()
