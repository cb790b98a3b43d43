"""xr-review's local accounts: names, roles, Argon2id password hashes (argon2-cffi), and the changes to
them, each recorded in the audit trail in the same transaction."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from xr.core.errors import XRError
from xr.results import audit
from xr.results.schema import ROLES, User, utcnow

# argon2-cffi's defaults are Argon2id with RFC 9106's low-memory profile (t=3, 64 MiB, p=4)
HASHER = PasswordHasher()
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MIN_PASSWORD = 10
MAX_PASSWORD = 1024  # Argon2 takes any length; a bound keeps one request from hashing megabytes


@dataclass(frozen=True)
class Account:
    name: str
    role: str


def check_name(name: str) -> str:
    if not NAME.fullmatch(name or ""):
        raise XRError(
            f"user name {name!r}: 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
        )
    return name


def check_password(password: str) -> str:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise XRError(f"a password must have {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return password


def find(s: Session, name: str) -> User | None:
    return s.scalar(select(User).where(User.name == name))


def add(s: Session, name: str, role: str, password: str | None, *, by: str, remote_addr: str | None = None) -> None:
    """A new account; ``password`` None makes one that signs in only through a trusted proxy."""
    check_name(name)
    if role not in ROLES:
        raise XRError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if find(s, name) is not None:
        raise XRError(f"user {name} exists already")
    now = utcnow()
    hashed = HASHER.hash(check_password(password)) if password is not None else None
    s.add(User(name=name, role=role, password_hash=hashed, active=True, created_at=now, password_changed_at=now))
    audit.record(s, "user_added", user=by, remote_addr=remote_addr, detail=f"{name} as {role}")


def _existing(s: Session, name: str) -> User:
    user = find(s, name)
    if user is None:
        raise XRError(f"no user {name}")
    return user


def set_active(s: Session, name: str, active: bool, *, by: str, remote_addr: str | None = None) -> None:
    """Disable (or enable again) an account: a disabled one cannot sign in, and its open sessions end."""
    _existing(s, name).active = active
    audit.record(s, "user_enabled" if active else "user_disabled", user=by, remote_addr=remote_addr, detail=name)


def set_password(s: Session, name: str, password: str, *, by: str, remote_addr: str | None = None) -> None:
    user = _existing(s, name)
    user.password_hash = HASHER.hash(check_password(password))
    user.password_changed_at = utcnow()
    audit.record(s, "user_password_changed", user=by, remote_addr=remote_addr, detail=name)


_DUMMY: dict[tuple[int, int, int], str] = {}


def _dummy_hash() -> str:
    """A hash with today's parameters, checked when the name is unknown: a wrong name takes as long as a
    wrong password."""
    key = (HASHER.time_cost, HASHER.memory_cost, HASHER.parallelism)
    if key not in _DUMMY:
        _DUMMY[key] = HASHER.hash("not a password of anyone")
    return _DUMMY[key]


def verify(s: Session, name: str, password: str) -> tuple[Account | None, str]:
    """(the account, "ok") when ``password`` is right for an active account, else (None, the reason).

    The reason goes to the audit trail only; the login page says the same to every failure. A hash made
    with older parameters is replaced by one with today's on a successful check.
    """
    user = find(s, name) if NAME.fullmatch(name or "") else None
    hashed = user.password_hash if user is not None and user.password_hash else _dummy_hash()
    try:
        HASHER.verify(hashed, password[:MAX_PASSWORD])
        matched = user is not None and user.password_hash is not None
    except (VerificationError, InvalidHashError):
        matched = False
    if user is None:
        return None, "unknown user"
    if not matched:
        return None, "wrong password" if user.password_hash else "no password (proxy sign-in only)"
    if not user.active:
        return None, "account disabled"
    if HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = HASHER.hash(password)
    return Account(user.name, user.role), "ok"


def active_account(s: Session, name: str, *, signed_in_at: dt.datetime | None = None) -> Account | None:
    """The account behind a session or a proxy's header, while it exists and is active (and, for a session
    that signed in at ``signed_in_at``, its password has not changed since)."""
    user = find(s, name)
    if user is None or not user.active:
        return None
    if signed_in_at is not None and user.password_changed_at is not None and user.password_changed_at > signed_in_at:
        return None
    return Account(user.name, user.role)


def listing(s: Session) -> list[User]:
    return list(s.scalars(select(User).order_by(User.name)))
