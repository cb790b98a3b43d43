"""xr-review in a real browser: Playwright drives Debian's chromium over seeded results.

Skipped, with the reason, where chromium or Playwright is missing (`make test` installs both where it can);
a failure instead under XR_REQUIRE_BROWSER=1 (CI).
Screenshots of the queue and a case are written to $XR_SCREENSHOTS (default: the test's tmp folder)."""

from __future__ import annotations

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


def _missing(what: str) -> None:
    """Skip, naming what is missing; under XR_REQUIRE_BROWSER=1 (CI) fail instead."""
    if os.environ.get("XR_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{what}, and XR_REQUIRE_BROWSER=1: `make browser` should have installed it")
    pytest.skip(f"{what}: the browser test needs it")


@pytest.fixture()
def browser():  # per test: Playwright's thread ends with it (the leaked-thread guard checks)
    if CHROMIUM is None:
        _missing("chromium not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright not installed (pip install playwright)")
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


def _seed(out: Path, xray_paths: list[Path]) -> None:
    """Four flagged films as the daemon leaves them (moved to processed/, a 512-pixel heatmap each), written
    straight to the database as tests/test_review_app.py does: the page under test reads only these."""
    import datetime as dt

    from PIL import Image

    from xr.results.engine import make_engine, session_factory
    from xr.results.schema import Result, Status

    (out / "processed").mkdir(parents=True)
    (out / "heatmaps").mkdir()
    t0 = dt.datetime(2026, 12, 1, 9)
    eng = make_engine(out / "results.sqlite")
    with session_factory(eng).begin() as s:
        for i, src in enumerate(xray_paths[:2] + xray_paths[-2:]):
            dst = out / "processed" / src.name
            shutil.copy(src, dst)
            heatmap = out / "heatmaps" / f"{i + 1}.png"
            Image.new("RGB", (512, 512), (200, 40 * i, 0)).save(heatmap)
            s.add(
                Result(
                    path=f"/in/{src.name}",
                    filename=src.name,
                    size_bytes=dst.stat().st_size,
                    mtime_ns=i,
                    status=Status.OK,
                    probability=0.9 - 0.1 * i,
                    threshold=0.001,
                    flagged=True,
                    model_id="m-1",
                    calibration_id="validation-x",
                    received_at=t0,
                    claimed_at=t0,
                    processed_at=t0,
                    moved_to=str(dst),
                    moved_at=t0,
                    heatmap_path=str(heatmap),
                )
            )
    eng.dispose()


@pytest.fixture()
def served(tmp_path, xray_paths):
    """Four flagged films with their heatmaps, and the real xr-review process serving them."""
    out = tmp_path / "out"
    _seed(out, xray_paths)
    port = _free_port()
    server = subprocess.Popen(
        [Path(sys.executable).parent / "xr-review", "--output", out, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    said = server.communicate(timeout=30)[0].decode(errors="replace")[-2000:]
                    pytest.fail(f"xr-review never listened on port {port} (rc={server.poll()}): {said}")
                time.sleep(0.2)
        yield url
    finally:
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
