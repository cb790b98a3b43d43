"""``xr-review``: the reading list in a browser, over the results database (a process apart from the daemon).

Routes: ``GET /`` the queue (flagged and audit cases not yet reviewed, in order of arrival, so an audit
case cannot be told by its place; filters by day and accession), ``GET /cases/{id}`` one case,
``GET /cases/{id}/image`` and ``/heatmap`` its pictures, ``POST /cases/{id}/review`` a decision
(``pneumonia`` or ``normal``, an optional note), ``GET /performance`` the flag's performance at this site
(review/routes_performance.py), ``GET /audit`` the audit trail, ``/admin/users`` the accounts, ``/login``
and ``POST /logout``, ``GET /healthz``.

An audit case (an unflagged film drawn for review, ``results.audit``) is blinded until it is reviewed: its
page shows no probability, flag or heatmap, and its heatmap route answers as if it had none.

Every route but ``/login``, ``/healthz`` and ``/static`` needs a signed-in account (review/auth.py): pages
redirect to ``/login``, pictures answer 401. Readers decide; auditors look and read the audit trail;
admins manage accounts (docs/security.md). Each look at patient data and each decision is an audit row.
Requests with a Host header outside the allowlist answer 400; a POST needs the form's CSRF token and,
where the browser says, the same origin. Every response carries the security headers, and everything
but the stylesheet ``Cache-Control: no-store``.

Only files under the output folder are ever read: a case's film only for a scored row (ok or duplicate)
whose film the daemon moved to ``processed/``, decoded within the daemon's limits one at a time and kept as
a private PNG under ``thumbnails/`` (decoded once per film and size); its heatmap from ``heatmaps/``. Every value from the
database is HTML-escaped by Jinja2's autoescaping.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import and_, func, or_, select, text

from xr.core.errors import ImageError, XRError
from xr.core.files import make_dirs, write_private
from xr.core.imaging import load_image
from xr.core.intake import DEFAULT_LIMITS, DecodeLimits
from xr.results import audit
from xr.results.engine import session_factory
from xr.results.export import export_reviews
from xr.results.schema import DECISIONS, ROLES, SCORED, Result, Review, fs_path, utcnow
from xr.review import auth, routes_performance, users

HERE = Path(__file__).resolve().parent
IMAGE_SIDES = {"thumb": 160, "full": 1024}
THUMBNAILS = "thumbnails"  # <output>/thumbnails/: the films as served, decoded once
log = logging.getLogger("xr.review")

CSP = (
    "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'none'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass(frozen=True)
class Options:
    """How xr-review signs people in and whom it answers (config ``review.*`` and the flags)."""

    idle_timeout_s: float = 1800.0
    failed_logins: int = 5
    lockout_s: float = 900.0
    allowed_hosts: tuple[str, ...] = ()  # besides the loopback names
    trusted_proxy: str | None = None  # the one address whose user_header names the user
    user_header: str | None = None
    tls: bool = False  # served over HTTPS by uvicorn itself: cookies get Secure, responses HSTS

    @classmethod
    def from_settings(cls, cfg: Any, **flags: Any) -> Options:
        r = cfg.review
        hosts = tuple(dict.fromkeys([*r.allowed_hosts, *(flags.pop("allowed_hosts", None) or ())]))
        return cls(
            idle_timeout_s=r.idle_timeout_min * 60,
            failed_logins=r.failed_logins,
            lockout_s=r.lockout_min * 60,
            allowed_hosts=hosts,
            **flags,
        )


@dataclass(frozen=True)
class Who:
    """The account behind a request, its CSRF token and its session (None: signed in by the proxy)."""

    name: str
    role: str
    csrf: str
    sid: str | None


class NeedLogin(Exception):
    def __init__(self, picture: bool):
        self.picture = picture


def _signed_in(request: Request) -> Who:
    return request.app.state.need(request)


def _signed_in_picture(request: Request) -> Who:
    return request.app.state.need(request, picture=True)


# As dependencies, the login is checked before the form is read: a request without one learns nothing more.
SignedIn = Annotated[Who, Depends(_signed_in)]
SignedInPicture = Annotated[Who, Depends(_signed_in_picture)]


def allow(who: Who, *roles: str) -> None:
    if who.role not in roles:
        raise HTTPException(403, f"an {who.role} may not do this")


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this site only (never ``//other.host`` or a full URL)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def create_app(
    engine: Any, output: Path, limits: DecodeLimits = DEFAULT_LIMITS, options: Options | None = None
) -> FastAPI:
    """``limits``: the daemon's decode limits (``DecodeLimits.from_settings(cfg)``): a film shows as it was
    scored (its DICOM window) and one the daemon read is never refused here."""
    opts = options or Options()
    output = output.resolve()
    sessions = session_factory(engine)
    store = auth.Sessions(opts.idle_timeout_s)
    throttle = auth.Throttle(opts.failed_logins, opts.lockout_s)
    allowed = {h.lower() for h in (*auth.LOOPBACK_NAMES, *opts.allowed_hosts)}
    app = FastAPI(title="xr-triage review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sessions, app.state.throttle = store, throttle  # tests reach their clocks
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")  # autoescape on for .html
    export_reviews(output / "csv", sessions)  # reviews made while no CSV could be written

    # -- who is asking, from where ---------------------------------------------------------------------
    def from_proxy(request: Request) -> bool:
        return (
            opts.trusted_proxy is not None and request.client is not None and request.client.host == opts.trusted_proxy
        )

    def remote(request: Request) -> str | None:
        """The client's address; behind the trusted proxy, the one it appended to X-Forwarded-For."""
        forwarded = request.headers.get("x-forwarded-for")
        if from_proxy(request) and forwarded:
            return forwarded.rsplit(",", 1)[-1].strip()[:64]
        return request.client.host if request.client else None

    def https(request: Request) -> bool:
        return opts.tls or (from_proxy(request) and request.headers.get("x-forwarded-proto") == "https")

    def current(request: Request) -> Who | None:
        if from_proxy(request) and opts.user_header and request.headers.get(opts.user_header):
            name = request.headers[opts.user_header]
            with sessions() as s:
                account = users.active_account(s, name)
            return Who(account.name, account.role, store.proxy_csrf(account.name), None) if account else None
        got = store.get(request.cookies.get(auth.COOKIE))
        if got is None:
            return None
        sid, sess = got
        with sessions() as s:
            account = users.active_account(s, sess.user, signed_in_at=sess.signed_in_at)
        if account is None:  # disabled, or its password changed since: that session is over
            store.end(sid)
            return None
        return Who(account.name, account.role, sess.csrf, sid)

    def need(request: Request, picture: bool = False) -> Who:
        who = current(request)
        if who is None:
            raise NeedLogin(picture)
        return who

    app.state.need = need

    def check_csrf(request: Request, who: Who, token: str, action: str, case: Result | None = None) -> None:
        if not auth.same_token(token, who.csrf):
            with sessions.begin() as s:
                audit.record(
                    s, action, user=who.name, outcome="denied", case=case, remote_addr=remote(request),
                    detail="missing or wrong CSRF token",
                )  # fmt: skip
            raise HTTPException(403, "the form's token is missing or stale: reload the page")

    def page(request: Request, name: str, who: Who | None, context: dict[str, Any], status: int = 200) -> Response:
        base = {"who": who, "csrf": who.csrf if who else "", "roles": ROLES}
        return templates.TemplateResponse(request, name, {**base, **context}, status_code=status)

    @app.exception_handler(NeedLogin)
    def _need_login(request: Request, exc: NeedLogin) -> Response:
        if exc.picture:
            return PlainTextResponse("sign in first", status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    # -- every request: Host allowlist, same-origin POSTs, security headers ---------------------------
    def same_origin(request: Request) -> bool:
        """False for a request a page of another site made. Sec-Fetch-Site, which no page can set, decides
        where the browser sends it; else a real Origin must be this site. Under ``Referrer-Policy: no-referrer``
        browsers send ``Origin: null`` with their own form posts: that, or no Origin at all (older clients),
        leaves the decision to the CSRF token."""
        site = request.headers.get("sec-fetch-site")
        if site is not None:
            return site == "same-origin"
        origin = request.headers.get("origin")
        if origin is None or origin == "null":
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc.lower() == request.headers.get("host", "").lower()

    @app.middleware("http")
    async def guard(request: Request, call_next) -> Response:
        if auth.host_name(request.headers.get("host", "")) not in allowed:
            # DNS rebinding: a page of another site reaching this port under its own name
            response: Response = PlainTextResponse("unknown Host: start xr-review with --allowed-host NAME", 400)
        elif request.method not in SAFE_METHODS and not same_origin(request):
            response = PlainTextResponse("cross-site request refused", 403)
        else:
            response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if not request.url.path.startswith("/static/"):  # patient data, or pages about it
            response.headers["Cache-Control"] = "no-store"
        if https(request):
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        return response

    # -- signing in and out -----------------------------------------------------------------------------
    def login_page(request: Request, next_: str, error: str | None, status: int = 200) -> Response:
        nonce = secrets.token_urlsafe(32)
        response = page(request, "login.html", None, {"nonce": nonce, "next": next_, "error": error}, status)
        response.set_cookie(auth.LOGIN_COOKIE, nonce, httponly=True, samesite="strict", secure=https(request))
        return response

    @app.get("/login")
    def login_form(request: Request, next: str = "/") -> Response:
        if current(request) is not None:
            return RedirectResponse(safe_next(next), status_code=303)
        return login_page(request, safe_next(next), None)

    @app.post("/login")
    def login(
        request: Request,
        username: Annotated[str, Form(max_length=256)],
        password: Annotated[str, Form(max_length=users.MAX_PASSWORD)],
        csrf: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "/",
    ) -> Response:
        target = safe_next(next)
        if not auth.same_token(csrf, request.cookies.get(auth.LOGIN_COOKIE)):
            return login_page(request, target, "The form had expired: please sign in again.", 403)
        addr = remote(request) or "?"
        name = username.strip()
        shown = name if users.NAME.fullmatch(name) else "(not a user name)"  # a password typed as the name stays out
        if throttle.blocked(name, addr):
            with sessions.begin() as s:
                audit.record(s, "login_failed", user=shown, outcome="denied", remote_addr=addr, detail="throttled")
            minutes = max(1, round(opts.lockout_s / 60))
            return login_page(request, target, f"Too many failed sign-ins: try again in {minutes} minutes.", 429)
        with sessions.begin() as s:
            account, reason = users.verify(s, name, password)
            if account is None:
                audit.record(s, "login_failed", user=shown, outcome="failed", remote_addr=addr, detail=reason)
            else:
                audit.record(s, "login", user=account.name, remote_addr=addr)
        if account is None:
            throttle.failed(name, addr)
            return login_page(request, target, "Wrong user name or password.", 401)
        throttle.succeeded(name)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            auth.COOKIE, store.start(account.name), httponly=True, samesite="strict", secure=https(request)
        )
        response.delete_cookie(auth.LOGIN_COOKIE)
        return response

    @app.post("/logout")
    def logout(request: Request, who: SignedIn, csrf: Annotated[str, Form()] = "") -> Response:
        check_csrf(request, who, csrf, "logout")
        if who.sid:
            store.end(who.sid)
        with sessions.begin() as s:
            audit.record(s, "logout", user=who.name, remote_addr=remote(request))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(auth.COOKIE, httponly=True, samesite="strict", secure=https(request))
        return response

    # -- the reading list -------------------------------------------------------------------------------
    decoding = threading.Lock()  # one film decoded at a time, whatever the number of requests

    def under_output(stored: str | None, sub: str | None = None) -> Path:
        """The file a row names, only if it lies under the output folder (``sub`` of it): else 404."""
        if not stored:
            raise HTTPException(404, "no file for this case")
        path = Path(fs_path(stored)).resolve()
        root = output / sub if sub else output
        if not path.is_relative_to(root) or not path.is_file():
            raise HTTPException(404, "the file is not in the output folder")
        return path

    def case(s, case_id: int, *, lock: bool = False) -> Result:
        row = s.get(Result, case_id, with_for_update=lock)
        if row is None:
            raise HTTPException(404, f"no case {case_id}")
        return row

    def blinded(s, row: Result) -> bool:
        """An audit case nobody has decided yet: the reader must see the film as they would any other."""
        return bool(row.audit) and s.scalar(select(Review.id).where(Review.result_id == row.id).limit(1)) is None

    @app.get("/")
    def queue(request: Request, who: SignedIn, day: str | None = None, accession: str | None = None) -> Response:
        reviewed = select(Review.result_id)
        to_read = or_(and_(Result.flagged.is_(True), Result.status.in_(SCORED)), Result.audit.is_(True))
        stmt = select(Result).where(to_read, Result.id.not_in(reviewed))
        if day:
            try:
                start = dt.datetime.fromisoformat(day)
            except ValueError:
                raise HTTPException(400, f"day must be YYYY-MM-DD, got {day!r}") from None
            stmt = stmt.where(Result.processed_at >= start, Result.processed_at < start + dt.timedelta(days=1))
        if accession:
            stmt = stmt.where(Result.accession_number == accession)
        with sessions.begin() as s:
            # by arrival: flagged and audit cases interleave, and nothing on the list tells them apart
            rows = s.scalars(stmt.order_by(Result.received_at, Result.id).limit(500)).all()
            n_reviewed = s.scalar(select(func.count()).select_from(Review)) or 0
            filters = ", ".join(f"{k}={v}" for k, v in (("day", day), ("accession", accession)) if v)
            audit.record(
                s, "view_queue", user=who.name, remote_addr=remote(request),
                detail=f"{len(rows)} cases" + (f" ({filters})" if filters else ""),
            )  # fmt: skip
        context = {"rows": rows, "day": day or "", "accession": accession or "", "n_reviewed": n_reviewed}
        return page(request, "queue.html", who, context)

    @app.get("/cases/{case_id}")
    def show(request: Request, who: SignedIn, case_id: int) -> Response:
        with sessions.begin() as s:
            row = case(s, case_id)
            reviews = s.scalars(select(Review).where(Review.result_id == case_id).order_by(Review.id)).all()
            audit.record(s, "view_case", user=who.name, case=row, remote_addr=remote(request))
        context = {
            "row": row,
            "reviews": reviews,
            "decisions": DECISIONS,
            "may_decide": who.role == "reader",
            "blinded": bool(row.audit) and not reviews,
        }
        return page(request, "case.html", who, context)

    @app.get("/cases/{case_id}/image")
    def image(
        request: Request,
        who: SignedInPicture,
        case_id: int,
        size: Annotated[str, Query(pattern="^(thumb|full)$")] = "full",
    ) -> Response:
        with sessions.begin() as s:
            row = case(s, case_id)
            scored = row.status in SCORED and row.moved_at is not None  # only films the daemon read and kept
            audit.record(
                s, "view_image", user=who.name, case=row, remote_addr=remote(request), detail=size,
                outcome="ok" if scored else "failed",
            )  # fmt: skip
        path = under_output(row.moved_to if scored else None, "processed")
        return Response(picture_of(row, path, size), media_type="image/png")

    def picture_of(row: Result, path: Path, size: str) -> bytes:
        """The film as a PNG of at most IMAGE_SIDES[size]: from the thumbnail cache, else decoded (one at a
        time: a film at the pixel limit takes hundreds of MB) and cached, private, for the next look."""
        key = hashlib.sha256(f"{row.id}|{row.sha256}|{row.moved_to}|{row.mtime_ns}".encode()).hexdigest()[:20]
        cached = output / THUMBNAILS / f"{row.id}-{key}-{size}.png"
        try:
            return cached.read_bytes()
        except OSError:
            pass
        with decoding:
            try:
                picture = load_image(path, limits, draft_size=(IMAGE_SIDES[size], IMAGE_SIDES[size]))
            except ImageError as exc:
                raise HTTPException(422, f"cannot show the film: {exc.reason}") from None
            picture.thumbnail((IMAGE_SIDES[size], IMAGE_SIDES[size]))
            buf = io.BytesIO()
            picture.save(buf, "PNG")
        try:
            make_dirs(cached.parent)
            write_private(cached, buf.getvalue(), durable=False)
        except OSError:
            pass  # an output folder this account may only read: served, not kept
        return buf.getvalue()

    @app.get("/cases/{case_id}/heatmap")
    def heatmap(request: Request, who: SignedInPicture, case_id: int) -> Response:
        with sessions.begin() as s:
            row = case(s, case_id)
            hidden = blinded(s, row)
            audit.record(
                s, "view_heatmap", user=who.name, case=row, remote_addr=remote(request),
                outcome="denied" if hidden else "ok", detail="audit case not yet reviewed" if hidden else None,
            )  # fmt: skip
        if hidden:  # the same answer as a film without one: the route tells nothing about the case
            raise HTTPException(404, "no file for this case")
        return FileResponse(under_output(row.heatmap_path, "heatmaps"), media_type="image/png")

    @app.post("/cases/{case_id}/review")
    def review(
        request: Request,
        who: SignedIn,
        case_id: int,
        decision: Annotated[str, Form()],
        note: Annotated[str, Form()] = "",
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        addr = remote(request)
        if who.role != "reader":
            with sessions.begin() as s:
                row = case(s, case_id)
                audit.record(s, "review", user=who.name, outcome="denied", case=row, remote_addr=addr, detail=who.role)
            raise HTTPException(403, f"only readers decide; this account is an {who.role}")
        check_csrf(request, who, csrf, "review")
        if decision not in DECISIONS:
            raise HTTPException(422, f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
        with sessions.begin() as s:
            row = case(s, case_id, lock=True)  # two tabs deciding one case at once: one waits for the other
            prior = s.scalar(select(Review).where(Review.result_id == case_id).order_by(Review.id).limit(1))
            if prior is None:
                s.add(
                    Review(
                        result_id=case_id,
                        decision=decision,
                        note=note.strip()[:2000] or None,
                        reviewer=who.name,
                        reviewed_at=utcnow(),
                    )
                )
                audit.record(s, "review", user=who.name, case=row, remote_addr=addr, detail=decision)
                conflict = None
            elif prior.reviewer == who.name and prior.decision == decision:
                # the same decision sent again (a retry after an error, a second click): recorded once
                audit.record(s, "review", user=who.name, case=row, remote_addr=addr, detail=f"{decision} (again)")
                conflict = None
            else:
                audit.record(
                    s, "review", user=who.name, outcome="denied", case=row, remote_addr=addr,
                    detail=f"{decision}: already reviewed ({prior.decision} by {prior.reviewer or 'unnamed'})",
                )  # fmt: skip
                conflict = (
                    f"case {case_id} was already reviewed: {prior.decision} by {prior.reviewer or 'an unnamed reader'}"
                )
        if conflict:
            raise HTTPException(409, conflict)
        try:
            export_reviews(output / "csv", sessions)
        except (OSError, XRError) as exc:  # the review stands; reviews.csv catches up at the next one or restart
            log.warning("reviews.csv not written: %s", exc)
        return RedirectResponse("/", status_code=303)

    routes_performance.mount(app, sessions=sessions, page=page, remote=remote)

    # -- the audit trail and the accounts --------------------------------------------------------------
    @app.get("/audit")
    def audit_page(
        request: Request,
        who: SignedIn,
        user: Annotated[str, Query(max_length=128)] = "",
        action: Annotated[str, Query(max_length=32)] = "",
        days: Annotated[float, Query(gt=0, le=3660)] = 7,
    ) -> Response:
        allow(who, "auditor", "admin")
        since = utcnow() - dt.timedelta(days=days)
        with sessions.begin() as s:
            rows = audit.query(s, since=since, user=user or None, action=action or None, limit=1000)
            audit.record(s, "view_audit", user=who.name, remote_addr=remote(request), detail=f"{len(rows)} rows")
        context = {"rows": rows[::-1], "user": user, "action": action, "days": days, "actions": audit.ACTIONS}
        return page(request, "audit.html", who, context)

    @app.get("/admin/users")
    def users_page(request: Request, who: SignedIn, error: str = "") -> Response:
        allow(who, "admin")
        with sessions() as s:
            accounts = users.listing(s)
        return page(request, "users.html", who, {"accounts": accounts, "error": error[:200]})

    def admin_change(request: Request, who: Who, csrf: str, action: str, change) -> Response:
        allow(who, "admin")
        check_csrf(request, who, csrf, action)
        try:
            with sessions.begin() as s:
                change(s, who)
        except XRError as exc:
            return RedirectResponse(f"/admin/users?error={quote(str(exc), safe='')}", status_code=303)
        return RedirectResponse("/admin/users", status_code=303)

    @app.post("/admin/users")
    def add_user(
        request: Request,
        who: SignedIn,
        name: Annotated[str, Form(max_length=64)],
        role: Annotated[str, Form()],
        password: Annotated[str, Form(max_length=users.MAX_PASSWORD)],
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        return admin_change(
            request,
            who,
            csrf,
            "user_added",
            lambda s, who: users.add(s, name.strip(), role, password, by=who.name, remote_addr=remote(request)),
        )

    @app.post("/admin/users/{name}/active")
    def set_active(
        request: Request, who: SignedIn, name: str, active: Annotated[bool, Form()], csrf: Annotated[str, Form()] = ""
    ) -> Response:
        def change(s, who: Who) -> None:
            if name == who.name and not active:
                raise XRError("an admin cannot disable their own account")
            users.set_active(s, name, active, by=who.name, remote_addr=remote(request))
            if not active:
                store.end_user(name)

        return admin_change(request, who, csrf, "user_enabled" if active else "user_disabled", change)

    @app.post("/admin/users/{name}/password")
    def set_password(
        request: Request,
        who: SignedIn,
        name: str,
        password: Annotated[str, Form(max_length=users.MAX_PASSWORD)],
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        def change(s, who: Who) -> None:
            users.set_password(s, name, password, by=who.name, remote_addr=remote(request))
            store.end_user(name)

        return admin_change(request, who, csrf, "user_password_changed", change)

    @app.get("/healthz")
    def healthz() -> Response:  # open to monitors: says nothing about patients
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1 from results limit 1"))
        except Exception as exc:  # noqa: BLE001 - any database failure is unhealthy, said plainly
            return JSONResponse({"status": "unhealthy", "reason": f"database: {type(exc).__name__}"}, status_code=503)
        return JSONResponse({"status": "ok"})

    return app
