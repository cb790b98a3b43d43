"""What xr-review's routers share: the account behind a request (``Who``) as a FastAPI dependency, checked
before the form is read, role checks, and the case a path names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from xr.results.schema import Result


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


def case(s, case_id: int, *, lock: bool = False) -> Result:
    row = s.get(Result, case_id, with_for_update=lock)
    if row is None:
        raise HTTPException(404, f"no case {case_id}")
    return row
