"""``xr-review``: the reading list in a browser, over the results database (a process apart from the daemon).

``create_app`` builds the app: who is asking and from where, the CSRF check, the page renderer, the
Host/origin guard and security headers and ``GET /healthz``; each routes module mounts its own routes on it:
review/routes_auth.py (``/login``, ``POST /logout``), review/routes_cases.py (``GET /`` the queue,
``GET /cases/{id}`` one case, ``POST /cases/{id}/review`` a decision), review/routes_pictures.py
(``/cases/{id}/image`` and ``/heatmap``), review/routes_performance.py (``GET /performance``) and
review/routes_admin.py (``GET /audit`` the audit trail, ``/admin/users`` the accounts). Their shared
dependencies (the signed-in account, role checks, the case a path names) are in review/deps.py.

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

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import text

from xr.core.intake import DEFAULT_LIMITS, DecodeLimits
from xr.results import audit
from xr.results.engine import session_factory
from xr.results.export import export_reviews
from xr.results.schema import ROLES, Result
from xr.review import auth, routes_admin, routes_auth, routes_cases, routes_performance, routes_pictures, users
from xr.review.deps import NeedLogin, Who

HERE = Path(__file__).resolve().parent

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
                    s,
                    action,
                    user=who.name,
                    outcome="denied",
                    case=case,
                    remote_addr=remote(request),
                    detail="missing or wrong CSRF token",
                )
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

    # -- the routes ------------------------------------------------------------------------------------
    routes_auth.mount(
        app,
        sessions=sessions,
        store=store,
        throttle=throttle,
        opts=opts,
        page=page,
        current=current,
        remote=remote,
        https=https,
        check_csrf=check_csrf,
    )
    routes_cases.mount(app, sessions=sessions, output=output, page=page, remote=remote, check_csrf=check_csrf)
    routes_pictures.mount(app, sessions=sessions, output=output, limits=limits, remote=remote)
    routes_performance.mount(app, sessions=sessions, page=page, remote=remote)
    routes_admin.mount(app, sessions=sessions, store=store, page=page, remote=remote, check_csrf=check_csrf)

    @app.get("/healthz")
    def healthz() -> Response:  # open to monitors: says nothing about patients
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1 from results limit 1"))
        except Exception as exc:  # noqa: BLE001 - any database failure is unhealthy, said plainly
            return JSONResponse({"status": "unhealthy", "reason": f"database: {type(exc).__name__}"}, status_code=503)
        return JSONResponse({"status": "ok"})

    return app
