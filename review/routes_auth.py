"""``GET``/``POST /login`` and ``POST /logout``: signing in (a login form with its own CSRF nonce, the
failed-login throttle) and out; each an audit row."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import FastAPI, Form, Request
from fastapi.responses import RedirectResponse, Response

from xr.results import audit
from xr.review import auth, users
from xr.review.deps import SignedIn, safe_next


def mount(app: FastAPI, *, sessions, store, throttle, opts, page, current, remote, https, check_csrf) -> None:

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
