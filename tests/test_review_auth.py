"""review/auth.py: sessions (signed ids, idle timeout, logout, disabled users), login throttling, Host names."""

from __future__ import annotations

import pytest

from xr.review import auth


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_session_is_a_signed_random_id_that_ends_when_idle():
    clock = Clock()
    store = auth.Sessions(idle_s=60, clock=clock)
    cookie = store.start("rita")
    sid, sess = store.get(cookie)
    assert sess.user == "rita" and len(sess.csrf) >= 40 and "rita" not in cookie
    clock.t += 59
    assert store.get(cookie) is not None  # used: the idle clock starts again
    clock.t += 59
    assert store.get(cookie) is not None
    clock.t += 61
    assert store.get(cookie) is None and store.get(cookie) is None  # idle too long: gone for good


def test_a_session_ends_after_a_working_day_however_busy():
    clock = Clock()
    store = auth.Sessions(idle_s=3600, clock=clock)
    cookie = store.start("rita")
    for _ in range(15):  # 45,000 s in steps of 3,000: never idle, past 12 hours
        clock.t += 3000
        store.get(cookie)
    assert store.get(cookie) is None


def test_forged_tampered_or_foreign_cookies_name_no_session():
    store = auth.Sessions(idle_s=60)
    cookie = store.start("rita")
    sid, _ = store.get(cookie)
    assert store.get(sid) is None  # the bare id, unsigned
    assert store.get(cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")) is None
    assert store.get("") is None and store.get(None) is None
    other = auth.Sessions(idle_s=60)  # another process's key: a restart signs everyone out
    assert other.get(cookie) is None


def test_logout_and_disabling_end_sessions():
    store = auth.Sessions(idle_s=60)
    a, b, c = store.start("rita"), store.start("rita"), store.start("sam")
    store.end(store.get(a)[0])
    assert store.get(a) is None and store.get(b) is not None
    store.end_user("rita")
    assert store.get(b) is None and store.get(c) is not None


def test_csrf_tokens_differ_per_session_and_compare_in_constant_time():
    store = auth.Sessions(idle_s=60)
    one, two = store.get(store.start("rita"))[1].csrf, store.get(store.start("rita"))[1].csrf
    assert one != two
    assert auth.same_token(one, one) and not auth.same_token(one, two)
    assert not auth.same_token("", "") and not auth.same_token(None, one)
    assert store.proxy_csrf("rita") == store.proxy_csrf("rita") != store.proxy_csrf("sam")
    assert auth.Sessions(idle_s=60).proxy_csrf("rita") != store.proxy_csrf("rita")  # bound to the process key


def test_failed_logins_pause_a_name_and_an_address_for_the_window():
    clock = Clock()
    t = auth.Throttle(limit=3, window_s=600, clock=clock)
    for _ in range(3):
        assert not t.blocked("Rita", "10.0.0.1")
        t.failed("Rita", "10.0.0.1")
    assert t.blocked("rita", "10.0.0.2")  # the name, from anywhere, any case
    assert not t.blocked("sam", "10.0.0.2")
    clock.t += 601
    assert not t.blocked("rita", "10.0.0.1")
    # one address trying many names is paused after 4 x limit failures
    for i in range(12):
        t.failed(f"user{i}", "10.0.0.9")
    assert t.blocked("someone-new", "10.0.0.9") and not t.blocked("someone-new", "10.0.0.8")


def test_a_success_clears_the_name_but_not_the_address():
    t = auth.Throttle(limit=2, window_s=600)
    t.failed("rita", "10.0.0.1")
    t.succeeded("rita")
    t.failed("rita", "10.0.0.1")
    assert not t.blocked("rita", "10.0.0.1")


def test_names_sprayed_at_the_login_page_do_not_pile_up():
    clock = Clock()
    t = auth.Throttle(limit=5, window_s=60, clock=clock)
    for i in range(t.MAX_KEYS):
        t.failed(f"user{i}", "10.0.0.1")
    clock.t += 61
    t.failed("one-more", "10.0.0.2")
    assert len(t._failures) == 2  # the expired ones are gone


@pytest.mark.parametrize(
    "header, name",
    [
        ("localhost:8765", "localhost"),
        ("LOCALHOST", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]:8765", "::1"),
        ("[::1]", "::1"),
        ("xr.example.org:443", "xr.example.org"),
        ("attacker.example", "attacker.example"),
        ("localhost.attacker.example", "localhost.attacker.example"),
        ("", ""),
    ],
)
def test_host_names_without_their_port(header, name):
    assert auth.host_name(header) == name


def test_loopback_addresses():
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert auth.is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "xr.example.org", ""):
        assert not auth.is_loopback(host), host
