"""For auditors and admins: ``GET /audit`` the audit trail; for admins: ``/admin/users`` the accounts (add,
enable or disable, set a password; a disabled account or a changed password ends its sessions)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated
from urllib.parse import quote

from fastapi import FastAPI, Form, Query, Request
from fastapi.responses import RedirectResponse, Response

from xr.core.errors import XRError
from xr.results import audit
from xr.results.schema import utcnow
from xr.review import users
from xr.review.deps import SignedIn, Who, allow


def mount(app: FastAPI, *, sessions, store, page, remote, check_csrf) -> None:

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
