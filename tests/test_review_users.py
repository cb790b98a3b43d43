"""review/users.py and ``xr-review users``, on SQLite and PostgreSQL: Argon2id hashes, roles, disabling,
new passwords, each change in the audit trail."""

from __future__ import annotations

import io

import pytest
from sqlalchemy import select

from xr.core.errors import XRError
from xr.results.engine import make_engine, session_factory
from xr.results.schema import AuditEvent, User
from xr.review import users
from xr.review.cli import main

PASSWORD = "correct horse battery"


def xr_review(monkeypatch, *argv: str, stdin: str = "") -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(list(argv))


def rows(db, model):
    eng = make_engine(db)
    try:
        with session_factory(eng)() as s:
            return list(s.scalars(select(model).order_by(model.id)))
    finally:
        eng.dispose()


def test_passwords_are_stored_as_argon2id_hashes_and_checked(any_db):
    eng = make_engine(any_db)
    sessions = session_factory(eng)
    try:
        with sessions.begin() as s:
            users.add(s, "rita", "reader", PASSWORD, by="test")
        with sessions() as s:
            stored = users.find(s, "rita").password_hash
        assert stored.startswith("$argon2id$") and PASSWORD not in stored
        assert "m=65536,t=3,p=4" in stored  # argon2-cffi's RFC 9106 low-memory profile
        with sessions.begin() as s:
            assert users.verify(s, "rita", PASSWORD) == (users.Account("rita", "reader"), "ok")
            assert users.verify(s, "rita", "correct horse batterY") == (None, "wrong password")
            assert users.verify(s, "ghost", PASSWORD) == (None, "unknown user")
            assert users.verify(s, "../../etc", PASSWORD) == (None, "unknown user")
        with sessions.begin() as s:
            users.set_active(s, "rita", False, by="test")
        with sessions.begin() as s:
            assert users.verify(s, "rita", PASSWORD) == (None, "account disabled")
            assert users.active_account(s, "rita") is None
    finally:
        eng.dispose()


def test_names_roles_and_passwords_are_checked(any_db):
    eng = make_engine(any_db)
    try:
        with session_factory(eng).begin() as s:
            for name, role, password, words in (
                ("", "reader", PASSWORD, "user name"),
                ("a b", "reader", PASSWORD, "user name"),
                ("=cmd", "reader", PASSWORD, "user name"),
                ("x" * 65, "reader", PASSWORD, "user name"),
                ("rita", "root", PASSWORD, "role must be one of reader, auditor, admin"),
                ("rita", "reader", "short", "10 to 1024 characters"),
            ):
                with pytest.raises(XRError, match=words):
                    users.add(s, name, role, password, by="test")
            users.add(s, "rita", "reader", PASSWORD, by="test")
            with pytest.raises(XRError, match="exists already"):
                users.add(s, "rita", "admin", PASSWORD, by="test")
            with pytest.raises(XRError, match="no user ghost"):
                users.set_active(s, "ghost", False, by="test")
    finally:
        eng.dispose()


def test_xr_review_users_add_list_disable_passwd(any_db, monkeypatch, capsys, tmp_path):
    db = ["--db", any_db, "--output", str(tmp_path)]
    assert (
        xr_review(
            monkeypatch, "users", "add", "rita", "--role", "reader", "--password-stdin", *db, stdin=PASSWORD + "\n"
        )
        == 0
    )
    assert (
        xr_review(monkeypatch, *db, "users", "add", "ada", "--role", "admin", "--password-stdin", stdin=PASSWORD) == 0
    )
    assert xr_review(monkeypatch, "users", "add", "sso", "--role", "auditor", "--no-password", *db) == 0
    assert "added rita (reader)" in capsys.readouterr().out
    assert xr_review(monkeypatch, "users", "list", *db) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:3] == ["name", "role", "state"]
    assert [line.split()[:3] for line in listing[1:]] == [
        ["ada", "admin", "active"],
        ["rita", "reader", "active"],
        ["sso", "auditor", "active*"],  # * no password: signs in through the proxy only
    ]
    assert PASSWORD not in "".join(listing)
    assert xr_review(monkeypatch, "users", "disable", "rita", *db) == 0
    assert xr_review(monkeypatch, "users", "passwd", "ada", "--password-stdin", *db, stdin="another long one\n") == 0
    assert xr_review(monkeypatch, "users", "enable", "rita", *db) == 0
    eng = make_engine(any_db)
    try:
        with session_factory(eng).begin() as s:
            assert users.verify(s, "ada", "another long one")[1] == "ok"
            assert users.verify(s, "ada", PASSWORD)[1] == "wrong password"
            assert users.verify(s, "rita", PASSWORD)[1] == "ok"
    finally:
        eng.dispose()
    trail = [(e.action, e.detail, e.remote_addr) for e in rows(any_db, AuditEvent)]
    assert trail == [
        ("user_added", "rita as reader", "local"),
        ("user_added", "ada as admin", "local"),
        ("user_added", "sso as auditor", "local"),
        ("user_disabled", "rita", "local"),
        ("user_password_changed", "ada", "local"),
        ("user_enabled", "rita", "local"),
    ]
    assert all(e.username.startswith("cli:") for e in rows(any_db, AuditEvent))


def test_xr_review_users_says_what_is_wrong(any_db, monkeypatch, capsys, tmp_path):
    db = ["--db", any_db, "--output", str(tmp_path)]
    assert (
        xr_review(monkeypatch, "users", "add", "rita", "--role", "reader", "--password-stdin", *db, stdin="short\n")
        == 2
    )
    assert "10 to 1024 characters" in capsys.readouterr().err
    assert xr_review(monkeypatch, "users", "add", "rita", "--role", "reader", *db) == 2  # stdin is no terminal
    assert "--password-stdin" in capsys.readouterr().err
    assert xr_review(monkeypatch, "users", "disable", "ghost", *db) == 2
    assert "no user ghost" in capsys.readouterr().err
    assert rows(any_db, User) == []
    with pytest.raises(SystemExit):
        xr_review(monkeypatch, "users", "add", "rita", "--role", "root", "--password-stdin", *db, stdin=PASSWORD)
