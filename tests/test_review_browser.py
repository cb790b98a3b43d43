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


PASSWORD = "correct horse battery"


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
    made = subprocess.run(  # the login step, as an admin does it
        [Path(sys.executable).parent / "xr-review", "users", "add", "rita", "--role", "reader", "--password-stdin"]
        + ["--output", out],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
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


def _wait_loaded(page, selector: str, timeout_s: float = 30) -> None:
    """Until every image ``selector`` finds has loaded. Not wait_for_function: the page's CSP forbids the
    eval it uses, as it should."""
    deadline = time.monotonic() + timeout_s
    while not page.eval_on_selector_all(
        selector, "imgs => imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)"
    ):
        assert time.monotonic() < deadline, f"{selector} never loaded"
        time.sleep(0.1)


def test_a_reader_signs_in_opens_a_case_sees_the_heatmap_reads_it_normal_and_signs_out(browser, served, tmp_path):
    shots = Path(os.environ.get("XR_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.goto(served + "/")
    page.wait_for_url(served + "/login?next=%2F")  # no login, no reading list
    page.fill("input[name=username]", "rita")
    page.fill("input[name=password]", "not her password")
    page.click("button[type=submit]")
    assert "Wrong user name or password." in page.content()
    page.fill("input[name=username]", "rita")
    page.fill("input[name=password]", PASSWORD)
    page.screenshot(path=str(shots / "login.png"), full_page=True)
    page.click("button[type=submit]")
    page.wait_for_url(served + "/")
    rows = page.locator("table.queue tbody tr")
    assert rows.count() == 4 and "rita" in page.locator("header .who").inner_text()
    _wait_loaded(page, "td.thumb img")
    page.screenshot(path=str(shots / "queue.png"), full_page=True)
    page.locator("a.case-link").first.click()
    page.wait_for_selector("#heatmap")
    _wait_loaded(page, "#heatmap, #film")
    assert page.locator("#heatmap").evaluate("i => i.naturalWidth") >= 256
    assert page.locator("input[name=reviewer]").count() == 0  # the reader is the signed-in user, not a field
    page.screenshot(path=str(shots / "case.png"), full_page=True)
    page.fill("textarea[name=note]", "old scar")
    page.click("button.normal")  # the browser's own POST: same origin, with the form's token
    page.wait_for_url(served + "/")
    assert page.locator("table.queue tbody tr").count() == 3
    assert "1 review recorded" in page.content()
    reviews = (tmp_path / "out" / "csv" / "reviews.csv").read_text().splitlines()
    assert len(reviews) == 2 and reviews[1].split(",")[3:5] == ["old scar", "rita"]
    page.click("form.logout button")
    page.wait_for_url(served + "/login")
    page.goto(served + "/cases/1")
    page.wait_for_url(served + "/login?next=%2Fcases%2F1")  # signed out: the session is gone
    page.close()
