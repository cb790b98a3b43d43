"""review/app.py through FastAPI's TestClient, on SQLite and PostgreSQL: the queue, a case, the pictures, a
review, signing in and out, roles, the audit trail, and what it refuses (forged requests, foreign Host
headers, requests without a login)."""

from __future__ import annotations

import csv
import datetime as dt
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select

from xr.results.engine import make_engine, session_factory
from xr.results.schema import AuditEvent, Result, Review, Status
from xr.review import users

T0 = dt.datetime(2026, 12, 1, 9)
PASSWORD = "correct horse battery"
BASE = "http://localhost"


@pytest.fixture(autouse=True)
def quick_hashes(monkeypatch):
    """Argon2id with small costs: these tests sign in dozens of times (tests/test_review_users.py checks the
    real parameters)."""
    from argon2 import PasswordHasher

    monkeypatch.setattr(users, "HASHER", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


@dataclass
class Site:
    app: Any
    eng: Any
    out: Path
    client: Any  # signed in as "rita", a reader

    def new_client(self, **kw):
        from fastapi.testclient import TestClient

        return TestClient(self.app, base_url=kw.pop("base_url", BASE), **kw)

    def user(self, name: str, role: str, password: str | None = PASSWORD) -> None:
        with session_factory(self.eng).begin() as s:
            users.add(s, name, role, password, by="test")

    def signed_in(self, name: str, role: str):
        self.user(name, role)
        client = self.new_client()
        assert login(client, name).status_code == 303
        return client

    def audit(self, action: str | None = None) -> list[AuditEvent]:
        with session_factory(self.eng)() as s:
            stmt = select(AuditEvent).order_by(AuditEvent.id)
            return list(s.scalars(stmt.where(AuditEvent.action == action) if action else stmt))

    def reviews(self) -> list[Review]:
        with session_factory(self.eng)() as s:
            return list(s.scalars(select(Review).order_by(Review.id)))


def login(client, name: str, password: str = PASSWORD, next_: str = "/"):
    page = client.get("/login")
    nonce = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    return client.post(
        "/login",
        data={"username": name, "password": password, "csrf": nonce, "next": next_},
        follow_redirects=False,
    )


def token(client, path: str = "/cases/1") -> str:
    """The CSRF token in the forms of ``path`` (fetched as that client)."""
    return re.search(r'name="csrf" value="([^"]+)"', client.get(path).text).group(1)


def make_site(tmp_path, xray_paths, db, options=None) -> Site:
    from xr.review.app import create_app

    out = tmp_path / "out"
    (out / "processed").mkdir(parents=True)
    (out / "heatmaps").mkdir()
    eng = make_engine(db)
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
                    patient_id=f"PAT-{i + 1}",
                    received_at=T0,
                    claimed_at=T0,
                    processed_at=T0 + dt.timedelta(days=i % 2),
                    moved_to=str(dst),
                    moved_at=T0,
                    heatmap_path=str(out / "heatmaps" / f"{i + 1}.png"),
                )
            )
            s.flush()
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
    app = create_app(eng, out, options=options)
    site = Site(app, eng, out, None)
    site.client = site.signed_in("rita", "reader")
    return site


@pytest.fixture()
def site(tmp_path, xray_paths, any_db):
    s = make_site(tmp_path, xray_paths, any_db)
    yield s
    s.eng.dispose()


def in_queue(client, case_id: int) -> bool:
    return f'"/cases/{case_id}"' in client.get("/").text


# -- the pages, signed in ----------------------------------------------------------------------------------
def test_queue_is_flagged_and_audit_unreviewed_by_arrival_and_escaped(site):
    client = site.client
    page = client.get("/")
    assert page.status_code == 200
    html = page.text
    assert "<img src=x onerror" not in html and "&lt;img src=x onerror=alert(1)&gt;.jpeg" in html
    order = [html.index(f'/cases/{i}"') for i in (1, 2, 3, 5)]  # arrival order (one time: by id)
    assert order == sorted(order) and '/cases/4"' not in html  # c.jpeg: neither flagged nor audit
    assert "4 to read" in html and "%" not in html.split("<table", 1)[1]  # no probability on the list
    _make_audit_case(site, 4)
    html = client.get("/").text
    order = [html.index(f'/cases/{i}"') for i in (1, 2, 3, 4, 5)]
    assert order == sorted(order) and "5 to read" in html
    only = client.get("/", params={"accession": "ACC-2"}).text
    assert "b.jpeg" in only and "a.jpeg" not in only
    day = client.get("/", params={"day": "2026-12-02"}).text  # b.jpeg was scored on the second day
    assert "b.jpeg" in day and "a.jpeg" not in day
    assert client.get("/", params={"day": "yesterday"}).status_code == 400


def _make_audit_case(site, case_id: int) -> None:
    with session_factory(site.eng).begin() as s:
        s.get(Result, case_id).audit = True


def test_an_audit_case_is_blinded_until_the_reader_decides(site):
    """Its page shows the film but no probability, flag or heatmap; its heatmap route answers as for a film
    without one (and the refusal is in the audit trail); after the decision the page shows what the model
    said, and the case leaves the list."""
    _make_audit_case(site, 4)  # c.jpeg: p 0.20, unflagged, with a heatmap file on disk
    client = site.client
    page = client.get("/cases/4").text
    assert "c.jpeg" in page and "20.0%" not in page and "Not flagged" not in page and "0.500" not in page
    assert "/cases/4/heatmap" not in page and "pneumonia or normal" in page
    assert client.get("/cases/4/image").status_code == 200  # the film itself
    assert client.get("/cases/4/image", params={"size": "thumb"}).status_code == 200
    hidden = client.get("/cases/4/heatmap")
    assert hidden.status_code == 404 and hidden.json() == {"detail": "no file for this case"}  # as for none
    assert [e.outcome for e in site.audit("view_heatmap")] == ["denied"]
    auditor = site.signed_in("ann", "auditor")  # blinded for every role until a reader decides
    assert "20.0%" not in auditor.get("/cases/4").text
    r = client.post("/cases/4/review", data={"decision": "normal", "csrf": token(client, "/cases/4")})
    assert r.status_code == 200 and not in_queue(client, 4)
    page = client.get("/cases/4").text
    assert "20.0%" in page and "audit case" in page and "/cases/4/heatmap" in page
    assert client.get("/cases/4/heatmap").status_code == 200


def test_case_page_and_pictures(site):
    client = site.client
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
    client = site.client
    assert client.get("/cases/5/image").status_code == 404  # moved_to outside the output folder
    assert client.get("/cases/5/heatmap").status_code == 404  # a path that climbs out of heatmaps/
    assert client.get("/cases/..%2F..%2Fetc%2Fpasswd/image").status_code in (404, 422)
    assert client.get("/static/..%2F..%2Fapp.py").status_code == 404
    assert client.get("/cases/1/image", params={"size": "../../x"}).status_code == 422


def test_a_review_is_recorded_under_the_signed_in_reader_whatever_the_form_says(site):
    client, out = site.client, site.out
    r = client.post(
        "/cases/1/review",
        data={"decision": "normal", "note": "old scar <b>", "reviewer": "Dr. Someone Else", "csrf": token(client)},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert not in_queue(client, 1)
    assert "old scar &lt;b&gt;" in client.get("/cases/1").text
    rows = list(csv.DictReader(open(out / "csv" / "reviews.csv")))
    assert [(x["result_id"], x["decision"], x["note"], x["reviewer"]) for x in rows] == [
        ("1", "normal", "old scar <b>", "rita")
    ]
    assert [v.reviewer for v in site.reviews()] == ["rita"]
    csrf = token(client, "/cases/2")
    assert client.post("/cases/2/review", data={"decision": "maybe", "csrf": csrf}).status_code == 422
    assert client.post("/cases/99/review", data={"decision": "pneumonia", "csrf": csrf}).status_code == 404
    assert client.get("/healthz").json() == {"status": "ok"}


def test_a_retried_review_is_recorded_once_when_the_csv_cannot_be_written(site):
    client, out = site.client, site.out
    shutil.rmtree(out / "csv", ignore_errors=True)
    (out / "csv").write_text("not a folder")  # reviews.csv cannot be written
    csrf = token(client)
    for _ in range(2):  # the reader's retry after the first answer
        r = client.post("/cases/1/review", data={"decision": "pneumonia", "csrf": csrf}, follow_redirects=False)
        assert r.status_code == 303
    assert [(v.result_id, v.decision) for v in site.reviews()] == [(1, "pneumonia")]
    # a different decision on a decided case is a conflict, not a second review
    r = client.post("/cases/1/review", data={"decision": "normal", "csrf": csrf}, follow_redirects=False)
    assert r.status_code == 409 and "already reviewed" in r.text
    assert len(site.reviews()) == 1
    (out / "csv").unlink()
    client.post("/cases/2/review", data={"decision": "normal", "csrf": csrf})
    rows = list(csv.DictReader(open(out / "csv" / "reviews.csv")))  # the first one caught up, once
    assert [(x["result_id"], x["decision"]) for x in rows] == [("1", "pneumonia"), ("2", "normal")]


# -- without a login -----------------------------------------------------------------------------------
def test_every_route_needs_a_login(site):
    anonymous = site.new_client()
    checked = 0
    for route in site.app.routes:
        path = getattr(route, "path", "")
        if path in ("/login", "/healthz") or path.startswith("/static"):
            continue
        url = path.replace("{case_id}", "1").replace("{name}", "rita")
        for method in sorted(route.methods - {"HEAD"}):
            r = anonymous.request(method, url, follow_redirects=False)
            if url.endswith(("/image", "/heatmap")):
                assert r.status_code == 401, (method, url)
            else:
                assert r.status_code == 303, (method, url, r.status_code)
                assert r.headers["location"].startswith("/login?next="), (method, url)
            assert "PAT-1" not in r.text and "a.jpeg" not in r.text
            checked += 1
    assert checked >= 10
    assert anonymous.get("/", follow_redirects=False).headers["location"] == "/login?next=%2F"
    health = anonymous.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert anonymous.get("/static/style.css").status_code == 200
    assert in_queue(site.client, 1) and site.reviews() == []


def test_signing_in_goes_where_the_reader_was_going_but_never_off_site(site):
    client = site.new_client()
    site.user("sam", "reader")
    r = login(client, "sam", next_="/cases/2")
    assert r.status_code == 303 and r.headers["location"] == "/cases/2"
    other = site.new_client()
    assert login(other, "sam", next_="//attacker.example/x").headers["location"] == "/"
    assert login(site.new_client(), "sam", next_="https://attacker.example/").headers["location"] == "/"


def test_a_wrong_password_is_refused_and_recorded(site):
    client = site.new_client()
    r = login(client, "rita", "not her password")
    assert r.status_code == 401 and "Wrong user name or password." in r.text
    assert client.get("/", follow_redirects=False).status_code == 303
    r = login(client, "nobody", PASSWORD)
    assert r.status_code == 401 and "Wrong user name or password." in r.text  # the same words for both
    r = login(client, "=HYPERLINK(1) secret-password")  # a password typed into the name field stays out
    failed = site.audit("login_failed")
    assert [(e.username, e.outcome, e.detail) for e in failed] == [
        ("rita", "failed", "wrong password"),
        ("nobody", "failed", "unknown user"),
        ("(not a user name)", "failed", "unknown user"),
    ]
    assert all(e.remote_addr == "testclient" for e in failed)


def test_a_login_form_posted_from_elsewhere_is_refused(site):
    client = site.new_client()
    r = client.post("/login", data={"username": "rita", "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 403 and client.get("/", follow_redirects=False).status_code == 303


def test_failed_logins_are_throttled(tmp_path, xray_paths, any_db):
    from xr.review.app import Options

    site = make_site(tmp_path, xray_paths, any_db, Options(failed_logins=3, lockout_s=600))
    try:
        client = site.new_client()
        for _ in range(3):
            assert login(client, "rita", "guess guess guess").status_code == 401
        r = login(client, "rita", PASSWORD)  # the right password, too late
        assert r.status_code == 429 and "Too many failed sign-ins" in r.text
        assert client.get("/", follow_redirects=False).status_code == 303
        assert site.audit("login_failed")[-1].detail == "throttled"
        clock = site.app.state.throttle
        clock.clock = lambda: 1e12  # the window has passed
        assert login(client, "rita", PASSWORD).status_code == 303
    finally:
        site.eng.dispose()


def test_logout_ends_the_session(site):
    client = site.client
    cookie = client.cookies.get("xr_session")
    r = client.post("/logout", data={"csrf": token(client, "/")}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    replay = site.new_client(cookies={"xr_session": cookie})  # the old cookie is worth nothing now
    assert replay.get("/", follow_redirects=False).status_code == 303
    assert replay.get("/cases/1/image").status_code == 401
    assert [e.username for e in site.audit("logout")] == ["rita"]


def test_a_forged_cookie_or_an_idle_session_is_not_a_login(site):
    forged = site.new_client(cookies={"xr_session": "rita"})
    assert forged.get("/", follow_redirects=False).status_code == 303
    store = site.app.state.sessions
    assert site.client.get("/").status_code == 200
    store.clock = lambda: 1e12  # long after the idle timeout
    assert site.client.get("/", follow_redirects=False).status_code == 303


def test_session_cookies_are_httponly_strict_and_secure_under_tls(site):
    from fastapi.testclient import TestClient

    from xr.review.app import Options, create_app

    tls = create_app(site.eng, site.out, options=Options(tls=True))
    for app, secure in ((site.app, False), (tls, True)):
        r = login(TestClient(app, base_url="https://localhost" if secure else BASE), "rita")
        cookie = r.headers["set-cookie"]
        assert "xr_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert ("Secure" in cookie) is secure


# -- forged requests ------------------------------------------------------------------------------------
def test_a_forged_cross_site_review_is_refused_and_the_case_stays_in_the_queue(site):
    client = site.client
    csrf = token(client)
    forged = [
        ({"decision": "normal"}, {}),  # no token: what a page of another site can send
        ({"decision": "normal", "csrf": "guessed"}, {}),
        ({"decision": "normal", "csrf": csrf}, {"Origin": "http://attacker.example"}),
        ({"decision": "normal", "csrf": csrf}, {"Origin": "null", "Sec-Fetch-Site": "cross-site"}),  # sandboxed
        ({"decision": "normal", "csrf": csrf}, {"Origin": "http://localhost", "Sec-Fetch-Site": "cross-site"}),
        ({"decision": "normal", "csrf": csrf}, {"Sec-Fetch-Site": "cross-site"}),
        ({"decision": "normal", "csrf": csrf}, {"Sec-Fetch-Site": "same-site"}),
    ]
    for data, headers in forged:
        r = client.post("/cases/1/review", data=data, headers=headers, follow_redirects=False)
        assert r.status_code == 403, (data, headers)
    assert in_queue(client, 1) and site.reviews() == []
    assert (
        not (site.out / "csv" / "reviews.csv").exists()
        or "normal" not in (site.out / "csv" / "reviews.csv").read_text()
    )
    ok = client.post(
        "/cases/1/review",
        data={"decision": "normal", "csrf": csrf},
        headers={"Origin": BASE, "Sec-Fetch-Site": "same-origin"},
        follow_redirects=False,
    )
    assert ok.status_code == 303 and not in_queue(client, 1)


def test_a_foreign_host_header_is_refused(site):
    for client in (site.client, site.new_client()):
        for path in ("/", "/cases/1", "/cases/1/image", "/login", "/healthz"):
            r = client.get(path, headers={"Host": "attacker.example"}, follow_redirects=False)
            assert r.status_code == 400, path
            assert "PAT-1" not in r.text and "a.jpeg" not in r.text
    for host in ("localhost:8765", "127.0.0.1:8765", "[::1]:8765"):
        assert site.client.get("/", headers={"Host": host}).status_code == 200, host


def test_an_allowed_host_is_served(tmp_path, xray_paths, any_db):
    from xr.review.app import Options

    site = make_site(tmp_path, xray_paths, any_db, Options(allowed_hosts=("xr.example.org",)))
    try:
        assert site.client.get("/", headers={"Host": "xr.example.org:443"}).status_code == 200
        assert site.client.get("/", headers={"Host": "attacker.example"}).status_code == 400
    finally:
        site.eng.dispose()


def test_security_headers_on_every_response(site):
    for client in (site.client, site.new_client()):
        for path in ("/", "/cases/1", "/cases/1/image", "/cases/1/heatmap", "/login", "/healthz", "/audit"):
            h = client.get(path, follow_redirects=False).headers
            assert "frame-ancestors 'none'" in h["content-security-policy"], path
            assert (
                "script-src 'none'" in h["content-security-policy"]
                and "unsafe-inline" not in h["content-security-policy"]
            )
            assert h["x-content-type-options"] == "nosniff" and h["referrer-policy"] == "no-referrer"
            assert h["cache-control"] == "no-store", path
    templates = Path(__file__).resolve().parent.parent / "review" / "templates"
    for page in templates.glob("*.html"):  # the CSP allows no inline script or style: none is written
        text = page.read_text()
        assert not re.search(r"<script|<style|\sstyle=|\son[a-z]+=", text), page.name


# -- roles ------------------------------------------------------------------------------------------------
def test_an_auditor_sees_cases_and_the_trail_but_cannot_decide(site):
    auditor = site.signed_in("audrey", "auditor")
    assert auditor.get("/").status_code == 200
    page = auditor.get("/cases/1").text
    assert "a.jpeg" in page and 'action="/cases/1/review"' not in page
    assert auditor.get("/cases/1/image").status_code == 200
    csrf = token(auditor, "/")
    r = auditor.post("/cases/1/review", data={"decision": "normal", "csrf": csrf}, follow_redirects=False)
    assert r.status_code == 403
    assert in_queue(site.client, 1) and site.reviews() == []
    denied = site.audit("review")[-1]
    assert (denied.username, denied.outcome, denied.result_id) == ("audrey", "denied", 1)
    trail = auditor.get("/audit")
    assert trail.status_code == 200 and "view_case" in trail.text and "audrey" in trail.text
    assert site.client.get("/audit").status_code == 403  # readers do not read the trail
    assert auditor.get("/admin/users").status_code == 403


def test_an_admin_manages_users_in_the_page(site):
    admin = site.signed_in("ada", "admin")
    assert "rita" in admin.get("/admin/users").text
    csrf = token(admin, "/admin/users")
    r = admin.post("/admin/users", data={"name": "nia", "role": "reader", "password": "a long password", "csrf": csrf})
    assert r.status_code == 200 and "nia" in r.text
    nia = site.new_client()
    assert login(nia, "nia", "a long password").status_code == 303
    short = admin.post("/admin/users", data={"name": "x", "role": "reader", "password": "short", "csrf": csrf})
    assert "10 to 1024 characters" in short.text
    assert (
        admin.post("/admin/users", data={"name": "y", "role": "reader", "password": "a long password"}).status_code
        == 403
    )
    # disabling ends the reader's session at once
    assert site.client.get("/").status_code == 200
    admin.post("/admin/users/rita/active", data={"active": "false", "csrf": csrf})
    assert site.client.get("/", follow_redirects=False).status_code == 303
    assert login(site.new_client(), "rita").status_code == 401
    assert (
        "cannot disable their own" in admin.post("/admin/users/ada/active", data={"active": "false", "csrf": csrf}).text
    )
    admin.post("/admin/users/nia/password", data={"password": "another long one", "csrf": csrf})
    assert nia.get("/", follow_redirects=False).status_code == 303  # a new password ends the old sessions
    assert [(e.action, e.username, e.outcome, e.detail) for e in site.audit() if e.action.startswith("user_")] == [
        ("user_added", "test", "ok", "rita as reader"),
        ("user_added", "test", "ok", "ada as admin"),
        ("user_added", "ada", "ok", "nia as reader"),
        ("user_added", "ada", "denied", "missing or wrong CSRF token"),
        ("user_disabled", "ada", "ok", "rita"),
        ("user_password_changed", "ada", "ok", "nia"),
    ]


# -- the audit trail --------------------------------------------------------------------------------------
def test_logins_looks_and_decisions_are_audited(site):
    client = site.client
    client.get("/cases/1")
    client.get("/cases/1/image", params={"size": "thumb"})
    client.get("/cases/1/heatmap")
    client.post("/cases/1/review", data={"decision": "pneumonia", "csrf": token(client)})
    rows = [(e.action, e.username, e.outcome, e.result_id) for e in site.audit()]
    assert ("login", "rita", "ok", None) in rows
    for action in ("view_case", "view_image", "view_heatmap", "review"):
        assert (action, "rita", "ok", 1) in rows, action
    review = site.audit("review")[-1]
    assert (review.accession_number, review.patient_id, review.detail) == ("ACC-1", "PAT-1", "pneumonia")
    assert site.audit("view_image")[0].detail == "thumb"
    assert all(e.remote_addr == "testclient" and e.at is not None for e in site.audit() if e.username == "rita")


# -- single sign-on through a trusted proxy ---------------------------------------------------------------
def test_a_trusted_proxy_names_the_user_and_no_one_else_can(tmp_path, xray_paths, any_db):
    from xr.review.app import Options

    site = make_site(tmp_path, xray_paths, any_db, Options(trusted_proxy="10.0.0.2", user_header="X-Forwarded-User"))
    try:
        site.user("sso-reader", "reader", password=None)
        proxy = site.new_client(client=("10.0.0.2", 40000), headers={"X-Forwarded-User": "sso-reader"})
        page = proxy.get("/", headers={"X-Forwarded-For": "192.0.2.7"})
        assert page.status_code == 200 and "sso-reader" in page.text
        csrf = token(proxy)
        assert proxy.post("/cases/1/review", data={"decision": "pneumonia", "csrf": csrf}).status_code == 200
        assert [v.reviewer for v in site.reviews()] == ["sso-reader"]
        assert site.audit("view_queue")[0].remote_addr == "192.0.2.7"  # the client the proxy names
        elsewhere = site.new_client(client=("10.0.0.9", 40000), headers={"X-Forwarded-User": "sso-reader"})
        assert elsewhere.get("/", follow_redirects=False).status_code == 303  # the header from anyone else
        unknown = site.new_client(client=("10.0.0.2", 40000), headers={"X-Forwarded-User": "mallory"})
        assert unknown.get("/", follow_redirects=False).status_code == 303
        assert login(site.new_client(), "sso-reader", PASSWORD).status_code == 401  # no password to sign in with
    finally:
        site.eng.dispose()


# -- the command ------------------------------------------------------------------------------------------
def test_xr_review_refuses_a_database_that_is_not_there(tmp_path, capsys):
    from xr.review.cli import main

    missing = tmp_path / "results.sqlite"
    assert main(["--db", str(missing), "--output", str(tmp_path)]) == 2
    assert f"results database not found: {missing}" in capsys.readouterr().err
    assert not missing.exists()  # not created empty


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::", "xr.example.org"])
def test_a_wide_bind_without_tls_or_a_proxy_is_refused(tmp_path, capsys, monkeypatch, host):
    from xr.review.cli import bind_refusal, build_parser, main

    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail(f"xr-review served plain HTTP on {host}"))
    db = tmp_path / "results.sqlite"
    make_engine(db).dispose()
    assert main(["--db", str(db), "--output", str(tmp_path), "--host", host]) == 2
    err = capsys.readouterr().err
    assert "plain HTTP to the network" in err and "--certfile" in err and "--trusted-proxy" in err
    parse = build_parser().parse_args
    assert bind_refusal(parse(["--host", host, "--certfile", "c.pem", "--keyfile", "k.pem"])) is None
    assert bind_refusal(parse(["--host", host, "--trusted-proxy", "10.0.0.2", "--user-header", "X-User"])) is None
    assert "go together" in bind_refusal(parse(["--host", host, "--certfile", "c.pem"]))
    for loopback in ("127.0.0.1", "localhost", "::1"):
        assert bind_refusal(parse(["--host", loopback])) is None


def test_the_performance_page_is_for_auditors_with_figures_and_charts(site):
    _make_audit_case(site, 4)
    client = site.client
    for case_id, decision in ((1, "pneumonia"), (2, "normal"), (4, "normal")):
        client.post(f"/cases/{case_id}/review", data={"decision": decision, "csrf": token(client, f"/cases/{case_id}")})
    assert client.get("/performance").status_code == 403  # a reader
    auditor = site.signed_in("ann", "auditor")
    page = auditor.get("/performance", params={"days": 3650})
    assert page.status_code == 200
    html = page.text
    assert "<svg" in html and "<script" not in html and "Sensitivity" in html and "PPV" in html
    assert "2 of flagged films, 1 audit cases" in html and "unknown" in html  # by scanner: no DICOM header
    assert site.audit("view_performance")[-1].username == "ann"


# -- the film endpoint: scored films only, within the limits, from the thumbnail cache --------------------
def _film_row(site, name: str, status: Status, folder: str, picture: Image.Image) -> int:
    dst = site.out / folder / name
    dst.parent.mkdir(exist_ok=True)
    picture.save(dst)
    with session_factory(site.eng).begin() as s:
        row = Result(
            path=f"/in/{name}",
            filename=name,
            size_bytes=1,
            mtime_ns=77,
            status=status,
            received_at=T0,
            claimed_at=T0,
            processed_at=T0,
            moved_to=str(dst),
            moved_at=T0,
            flagged=status == Status.OK,
            error="cannot decode" if status == Status.ERROR else None,
        )
        s.add(row)
        s.flush()
        return row.id


def test_an_error_rows_film_is_never_decoded(site, monkeypatch):
    """A file the daemon could not read (failed/) is not the reader's to look at, nor xr-review's to decode."""
    from xr.review import routes_pictures

    case = _film_row(site, "bad.png", Status.ERROR, "failed", Image.new("L", (64, 64)))
    monkeypatch.setattr(routes_pictures, "decode_image", lambda *a, **k: pytest.fail("an error row's film was decoded"))
    assert site.client.get(f"/cases/{case}/image").status_code == 404
    assert site.audit("view_image")[-1].outcome == "failed"


def test_a_huge_film_is_refused_before_its_pixels_are_decoded(site, monkeypatch):
    """A 64-megapixel PNG of a few hundred KB (what took xr-review to 1.4 GB): over the daemon's pixel limit,
    refused from its header, its pixels never decoded."""
    from PIL import ImageFile

    case = _film_row(site, "huge.png", Status.OK, "processed", Image.new("L", (8000, 8000)))
    assert (site.out / "processed" / "huge.png").stat().st_size < 400_000
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels decoded"))
    r = site.client.get(f"/cases/{case}/image")
    assert r.status_code == 422 and "64,000,000 pixels, over the limit of 30,000,000" in r.text
    assert not (site.out / "thumbnails").exists() or not list((site.out / "thumbnails").iterdir())


def test_a_film_is_decoded_once_into_a_private_thumbnail_cache(site, monkeypatch):
    from xr.review import routes_pictures

    first = site.client.get("/cases/1/image", params={"size": "thumb"})
    assert first.status_code == 200
    cached = list((site.out / "thumbnails").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("1-") and cached[0].name.endswith("-thumb.png")
    assert cached[0].stat().st_mode & 0o777 == 0o600 and (site.out / "thumbnails").stat().st_mode & 0o777 == 0o700
    monkeypatch.setattr(routes_pictures, "decode_image", lambda *a, **k: pytest.fail("decoded again"))
    again = site.client.get("/cases/1/image", params={"size": "thumb"})
    assert again.status_code == 200 and again.content == first.content
    assert len(site.audit("view_image")) == 2  # each look is still audited


def test_the_start_banner_hides_the_database_password(tmp_path, capsys, monkeypatch, pg_url):
    from xr.review.cli import main

    monkeypatch.setattr("uvicorn.run", lambda *a, **k: None)
    url = pg_url.replace("://postgres@", "://postgres:s3cret-pw@")
    make_engine(url).dispose()
    assert main(["--db", url, "--output", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "postgres:***@" in err and "s3cret-pw" not in err
