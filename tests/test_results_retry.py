"""results/retry.py, `xr-results retry ID...`: a film from failed/ goes back through the inbox (moved, never
copied or over another file) and, once scored, its old row names the new one; rows not in failed/ are
refused with a reason. On SQLite and on PostgreSQL (``any_db``)."""

from __future__ import annotations

import io
import shutil

from sqlalchemy import select
from test_daemon_e2e import run_once

from xr.results.cli import main
from xr.results.engine import make_engine, session_factory
from xr.results.schema import Result, Status


def _rows(db):
    engine = make_engine(db)
    try:
        with session_factory(engine)() as s:
            return {r.id: r for r in s.scalars(select(Result))}
    finally:
        engine.dispose()


def test_a_failed_film_retried_after_a_config_change_ends_ok_and_linked(
    tmp_path, tiny_checkpoint, xray_paths, capsys, any_db
):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    shutil.copy(xray_paths[0], inbox / "film.jpeg")
    shutil.copy(xray_paths[1], inbox / "fine.jpeg")
    # too large for this limit: an error row, the film in failed/ (the cause an operator then fixes)
    rc, _ = run_once(tmp_path, tiny_checkpoint, capsys, "--db", any_db, "--set", "daemon.max_file_mb=0.001")
    assert rc == 0
    db = any_db
    (old,) = [r for r in _rows(db).values() if r.filename == "film.jpeg"]
    assert old.status == Status.ERROR and (out / "failed" / "film.jpeg").exists()
    (inbox / "film.jpeg").write_bytes(b"another export of the same name")  # never overwritten

    args = ["--db", db, "--output", str(out), "retry", "--watch", str(inbox)]
    buf = io.StringIO()
    assert main([*args, str(old.id)], out=buf) == 0
    assert "film-1.jpeg" in buf.getvalue()
    assert not (out / "failed" / "film.jpeg").exists()  # moved, no copy left behind
    assert (inbox / "film.jpeg").read_bytes() == b"another export of the same name"
    assert main([*args, str(old.id)], out=io.StringIO()) == 1  # already retried
    assert "already retried" in capsys.readouterr().err
    (inbox / "film.jpeg").unlink()

    rc, _ = run_once(tmp_path, tiny_checkpoint, capsys, "--db", any_db)  # the limit back at its default
    assert rc == 0
    rows = _rows(db)
    kept = rows[old.id]
    assert kept.status == Status.ERROR and kept.moved_to is None and kept.retry_path == str(inbox / "film-1.jpeg")
    new = rows[kept.retried_as]
    assert new.status == Status.OK and new.filename == "film-1.jpeg" and new.id > old.id


def test_rows_not_in_failed_are_refused(tmp_path, tiny_checkpoint, xray_paths, capsys, any_db):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    shutil.copy(xray_paths[0], inbox / "ok.jpeg")
    assert run_once(tmp_path, tiny_checkpoint, capsys, "--db", any_db)[0] == 0
    db = any_db
    (ok,) = _rows(db).values()
    args = ["--db", db, "--output", str(out), "retry", "--watch", str(inbox)]
    assert main([*args, str(ok.id), "999"], out=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert f"row {ok.id} is ok: only films in failed/" in err and "no row 999" in err
    assert (out / "processed" / "ok.jpeg").exists() and not list(inbox.iterdir())
