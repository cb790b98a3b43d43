"""Sessions, CSRF tokens, failed-login throttling and the Host allowlist of xr-review.

A session lives in this process (a restart signs everyone out); the browser holds only its id, signed
with a key made at start-up (itsdangerous), in an HttpOnly, SameSite=Strict cookie. Sessions end after
``review.idle_timeout_min`` without a request, at logout, or when the account is disabled.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeSerializer

from xr.results.schema import utcnow

COOKIE = "xr_session"
LOGIN_COOKIE = "xr_login"  # the login form's own CSRF token, before there is a session
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MAX_SESSION_S = 12 * 3600  # whatever the activity, a session ends after a working day


@dataclass
class Session:
    user: str
    csrf: str
    started: float
    seen: float
    signed_in_at: dt.datetime  # UTC: a password changed after it ends the session


class Sessions:
    """Session ids -> sessions, with the idle timeout; thread-safe (FastAPI runs sync routes in threads)."""

    def __init__(self, idle_s: float, *, key: bytes | None = None, clock=time.monotonic):
        self.idle_s = idle_s
        self.clock = clock
        self.key = key or secrets.token_bytes(32)
        self._signer = URLSafeSerializer(self.key, salt="xr-review session")
        self._lock = threading.Lock()
        self._by_id: dict[str, Session] = {}

    def start(self, user: str) -> str:
        """A new session for ``user``: the signed cookie value."""
        sid = secrets.token_urlsafe(32)
        now = self.clock()
        with self._lock:
            self._expire(now)
            self._by_id[sid] = Session(user, secrets.token_urlsafe(32), now, now, utcnow())
        return self._signer.dumps(sid)

    def get(self, cookie: str | None) -> tuple[str, Session] | None:
        """The live session a cookie names (its last use now), or None: unsigned, unknown, idle or too old."""
        if not cookie:
            return None
        try:
            sid = self._signer.loads(cookie)
        except BadSignature:
            return None
        now = self.clock()
        with self._lock:
            sess = self._by_id.get(sid)
            if sess is None:
                return None
            if now - sess.seen > self.idle_s or now - sess.started > MAX_SESSION_S:
                del self._by_id[sid]
                return None
            sess.seen = now
            return sid, sess

    def end(self, sid: str) -> None:
        with self._lock:
            self._by_id.pop(sid, None)

    def end_user(self, user: str) -> None:
        """End every session of ``user`` (disabled, or a new password)."""
        with self._lock:
            for sid in [k for k, v in self._by_id.items() if v.user == user]:
                del self._by_id[sid]

    def _expire(self, now: float) -> None:
        for sid in [k for k, v in self._by_id.items() if now - v.seen > self.idle_s]:
            del self._by_id[sid]

    def proxy_csrf(self, user: str) -> str:
        """The CSRF token of a user signed in by a trusted proxy (no session of ours): bound to the name and
        this process's key."""
        return hmac.new(self.key, b"proxy:" + user.encode(), hashlib.sha256).hexdigest()


def same_token(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


class Throttle:
    """Failed logins: more than ``limit`` for one name, or ``4 x limit`` from one address, within
    ``window_s`` refuse further tries (even right ones) until the oldest failure is that old."""

    def __init__(self, limit: int, window_s: float, *, clock=time.monotonic):
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def _count(self, key: str, now: float) -> int:
        q = self._failures.get(key)
        if q is None:
            return 0
        while q and now - q[0] > self.window_s:
            q.popleft()
        if not q:
            del self._failures[key]
            return 0
        return len(q)

    def blocked(self, name: str, addr: str) -> bool:
        now = self.clock()
        with self._lock:
            return (
                self._count("user:" + name.lower(), now) >= self.limit
                or self._count("addr:" + addr, now) >= 4 * self.limit
            )

    MAX_KEYS = 10_000  # names sprayed at the login page: old ones are dropped rather than kept forever

    def failed(self, name: str, addr: str) -> None:
        now = self.clock()
        with self._lock:
            if len(self._failures) >= self.MAX_KEYS:
                for key in list(self._failures):
                    self._count(key, now)  # drops the keys whose failures are all older than the window
            self._failures["user:" + name.lower()].append(now)
            self._failures["addr:" + addr].append(now)

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop("user:" + name.lower(), None)


def host_name(host_header: str) -> str:
    """The name in a Host header, without the port: ``[::1]:8765`` -> ``::1``, ``Example.org:80`` -> ``example.org``."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else ""
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
