"""review/app.py through FastAPI's TestClient: the queue, a case, the pictures, a review, and what it refuses."""

from __future__ import annotations

import csv
import datetime as dt
import shutil

import pytest
from PIL import Image

from xr.results.engine import make_engine, session_factory
from xr.results.schema import Result, Status

T0 = dt.datetime(2026, 12, 1, 9)


@pytest.fixture()
def site(tmp_path, xray_paths):
    from fastapi.testclient import TestClient

    from xr.review.app import create_app

    out = tmp_path / "out"
    (out / "processed").mkdir(parents=True)
    (out / "heatmaps").mkdir()
    eng = make_engine(out / "results.sqlite")
    evil = "<img src=x onerror=alert(1)>.jpeg"
    films = [
        ("a.jpeg", 0.95, True, "ACC-1"),
        ("b.jpeg", 0.70, True, "ACC-2"),
        (evil, 0.99, True, None),
        ("c.jpeg", 0.20, False, "ACC-3"),
    ]
    with session_factory(eng).begin() as s:
        for i, (name, p, flagged, acc) in enumerate(films):
            dst = out / "processed" / name
            shutil.copy(xray_paths[i], dst)
            s.add(
                Result(
                    path=f"/in/{name}",
                    filename=name,
                    size_bytes=1,
                    mtime_ns=i,
                    status=Status.OK,
                    probability=p,
                    threshold=0.5,
                    flagged=flagged,
                    model_id="m-1",
                    calibration_id="validation-x",
                    accession_number=acc,
                    received_at=T0,
                    claimed_at=T0,
                    processed_at=T0 + dt.timedelta(days=i % 2),
                    moved_to=str(dst),
                    moved_at=T0,
                    heatmap_path=str(out / "heatmaps" / f"{i + 1}.png"),
                )
            )
            Image.new("RGB", (32, 32), (255, 0, 0)).save(out / "heatmaps" / f"{i + 1}.png")
        # crafted rows: files outside the output folder must never be read
        secret = tmp_path / "secret.png"
        Image.new("L", (8, 8)).save(secret)
        s.add(
            Result(
                path="/in/x.png",
                filename="x.png",
                size_bytes=1,
                mtime_ns=9,
                status=Status.OK,
                probability=0.9,
                flagged=True,
                model_id="m-1",
                received_at=T0,
                claimed_at=T0,
                processed_at=T0,
                moved_to=str(secret),
                moved_at=T0,
                heatmap_path=str(out / "heatmaps" / ".." / ".." / "secret.png"),
            )
        )
    client = TestClient(create_app(eng, out))
    yield client, out
    eng.dispose()


def test_queue_is_flagged_unreviewed_highest_first_and_escaped(site):
    client, _ = site
    page = client.get("/")
    assert page.status_code == 200
    html = page.text
    assert "<img src=x onerror" not in html and "&lt;img src=x onerror=alert(1)&gt;.jpeg" in html
    order = [html.index(f'/cases/{i}"') for i in (3, 1, 5, 2)]  # 0.99, 0.95, 0.90, 0.70; c.jpeg not flagged
    assert order == sorted(order) and '/cases/4"' not in html
    assert "4 flagged, not yet reviewed" in html
    only = client.get("/", params={"accession": "ACC-2"}).text
    assert "b.jpeg" in only and "a.jpeg" not in only
    day = client.get("/", params={"day": "2026-12-02"}).text  # b.jpeg was scored on the second day
    assert "b.jpeg" in day and "a.jpeg" not in day
    assert client.get("/", params={"day": "yesterday"}).status_code == 400


def test_case_page_and_pictures(site):
    client, _ = site
    page = client.get("/cases/1").text
    for words in ("a.jpeg", "95.0%", "0.500", "m-1", "validation-x", "ACC-1", 'src="/cases/1/heatmap"'):
        assert words in page, words
    img = client.get("/cases/1/image")
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    thumb = client.get("/cases/1/image", params={"size": "thumb"})
    assert thumb.status_code == 200 and len(thumb.content) < len(img.content)
    assert client.get("/cases/1/heatmap").headers["content-type"] == "image/png"
    assert client.get("/cases/99").status_code == 404


def test_files_outside_the_output_folder_are_never_served(site):
    client, _ = site
    assert client.get("/cases/5/image").status_code == 404  # moved_to outside the output folder
    assert client.get("/cases/5/heatmap").status_code == 404  # a path that climbs out of heatmaps/
    assert client.get("/cases/..%2F..%2Fetc%2Fpasswd/image").status_code in (404, 422)
    assert client.get("/static/..%2F..%2Fapp.py").status_code == 404
    assert client.get("/cases/1/image", params={"size": "../../x"}).status_code == 422


def test_a_review_takes_the_case_off_the_queue_and_is_recorded(site):
    client, out = site
    r = client.post(
        "/cases/1/review",
        data={"decision": "dismiss", "note": "old scar <b>", "reviewer": "Dr. R"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert '"/cases/1"' not in client.get("/").text
    assert "old scar &lt;b&gt;" in client.get("/cases/1").text
    rows = list(csv.DictReader(open(out / "csv" / "reviews.csv")))
    assert [(x["result_id"], x["decision"], x["note"], x["reviewer"]) for x in rows] == [
        ("1", "dismiss", "old scar <b>", "Dr. R")
    ]
    assert client.post("/cases/2/review", data={"decision": "maybe"}).status_code == 422
    assert client.post("/cases/99/review", data={"decision": "confirm"}).status_code == 404
    assert client.get("/healthz").json() == {"status": "ok"}


def test_xr_review_refuses_a_database_that_is_not_there(tmp_path, capsys):
    from xr.review.cli import main

    missing = tmp_path / "results.sqlite"
    assert main(["--db", str(missing), "--output", str(tmp_path)]) == 2
    assert f"results database not found: {missing}" in capsys.readouterr().err
    assert not missing.exists()  # not created empty
