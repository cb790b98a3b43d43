"""review/films.py: an `xr-results import` row's film shows in xr-review from its archive while it is the
file that was scored; otherwise, and for films retention deleted, the case page says why there is none.
Every look is in the audit trail."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil

import pytest
from test_review_app import T0, make_site, quick_hashes  # noqa: F401 - quick_hashes: autouse

from xr.results.engine import session_factory
from xr.results.schema import Result, Status


@pytest.fixture()
def site(tmp_path, xray_paths, any_db):
    s = make_site(tmp_path, xray_paths, any_db)
    yield s
    s.eng.dispose()


def _imported(site, film, **kw) -> int:
    st = film.stat()
    with session_factory(site.eng).begin() as s:
        row = Result(
            path=str(film),
            filename=film.name,
            size_bytes=st.st_size,
            mtime_ns=st.st_mtime_ns,
            sha256=hashlib.sha256(film.read_bytes()).hexdigest(),
            status=Status.OK,
            probability=0.9,
            threshold=0.5,
            flagged=True,
            model_id="m-1",
            worker_id="xr-score",
            received_at=T0,
            claimed_at=T0,
            processed_at=T0,
            moved_at=T0,
            moved_to=None,
            **kw,
        )
        s.add(row)
        s.flush()
        return row.id


def test_an_imported_film_shows_from_its_archive(site, tmp_path, xray_paths):
    film = tmp_path / "archive" / "2019" / "old.jpeg"
    film.parent.mkdir(parents=True)
    shutil.copy(xray_paths[5], film)
    case = _imported(site, film)
    page = site.client.get(f"/cases/{case}").text
    assert f'src="/cases/{case}/image"' in page and "from the archive" in page
    assert site.client.get(f"/cases/{case}/image").status_code == 200
    assert site.client.get(f"/cases/{case}/image", params={"size": "thumb"}).status_code == 200
    assert [e.outcome for e in site.audit("view_image")][-2:] == ["ok", "ok"]


def test_a_changed_or_missing_archive_film_is_not_shown_and_the_page_says_why(site, tmp_path, xray_paths):
    film = tmp_path / "archive" / "old.jpeg"
    film.parent.mkdir()
    shutil.copy(xray_paths[5], film)
    case = _imported(site, film)
    st = film.stat()
    data = film.read_bytes()  # one byte changed, size and modification time kept: only its SHA-256 tells
    film.write_bytes(data[:500] + bytes([data[500] ^ 1]) + data[501:])
    os.utime(film, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = site.client.get(f"/cases/{case}/image")
    assert r.status_code == 404 and "not the file that was scored" in r.json()["detail"]
    film.unlink()
    page = site.client.get(f"/cases/{case}").text
    assert "is no longer there" in page and f'src="/cases/{case}/image"' not in page
    assert site.client.get(f"/cases/{case}/image").status_code == 404
    assert site.audit("view_image")[-1].outcome == "failed"


def test_only_imported_rows_are_read_outside_the_output_folder(site, tmp_path, xray_paths):
    film = tmp_path / "elsewhere.jpeg"
    shutil.copy(xray_paths[5], film)
    case = _imported(site, film)
    with session_factory(site.eng).begin() as s:
        s.get(Result, case).worker_id = "host-1"  # a daemon's row: its film must be in processed/
    assert site.client.get(f"/cases/{case}/image").status_code == 404


def test_a_film_deleted_by_retention_is_explained(site):
    with session_factory(site.eng).begin() as s:
        row = s.get(Result, 1)
        os.unlink(row.moved_to)
        row.moved_to, row.pruned_at = None, dt.datetime(2027, 3, 1)
    page = site.client.get("/cases/1").text
    assert "deleted by retention on 2027-03-01" in page
    assert site.client.get("/cases/1/image").status_code == 404
