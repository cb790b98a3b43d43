"""results/backup.py, `xr-results backup DEST`: a consistent private copy of a live WAL-mode SQLite database;
pg_dump guidance for PostgreSQL."""

from __future__ import annotations

import datetime as dt
import io
import sqlite3
import threading

import pytest

from xr.core.errors import XRError
from xr.results.backup import backup
from xr.results.cli import main
from xr.results.engine import make_engine, open_existing, session_factory
from xr.results.schema import Result, Status


def _row(i: int) -> Result:
    return Result(
        path=f"/inbox/f{i}.png",
        filename=f"f{i}.png",
        size_bytes=1000 + i,
        mtime_ns=i,
        status=Status.ERROR,
        error="x" * 2000,  # a few MB in all: the copy takes long enough for the writer to commit meanwhile
        received_at=dt.datetime(2026, 1, 1) + dt.timedelta(seconds=i),
        claimed_at=dt.datetime(2026, 1, 1) + dt.timedelta(seconds=i),
    )


def test_backup_while_a_writer_commits(tmp_path):
    db = tmp_path / "results.sqlite"
    engine = make_engine(db)
    sessions = session_factory(engine)
    with sessions() as s:
        s.add_all(_row(i) for i in range(2000))
        s.commit()
    committed: list[int] = [r for (r,) in sqlite3.connect(db).execute("SELECT id FROM results")]
    lock, stop = threading.Lock(), threading.Event()
    errors: list[BaseException] = []

    def writer():
        i = 2000
        try:
            while not stop.is_set():
                with sessions() as s:
                    row = _row(i)
                    s.add(row)
                    s.commit()
                    with lock:
                        committed.append(row.id)
                i += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    try:
        while len(committed) < 2050:  # the writer is going
            threading.Event().wait(0.01)
        with lock:
            before = set(committed)
        done = backup(db, tmp_path / "copy.sqlite")
    finally:
        stop.set()
        t.join()
        engine.dispose()
    assert not errors, errors
    copy = sqlite3.connect(done.dest)
    assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert copy.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # one file: nothing beside it to keep
    ids = {r for (r,) in copy.execute("SELECT id FROM results")}
    copy.close()
    assert before <= ids, f"{len(before - ids)} rows committed before the backup are missing"
    assert (done.dest.stat().st_mode & 0o777) == 0o600
    open_existing(done.dest).dispose()  # an xr-triage database of this schema version
    assert not list(tmp_path.glob(".copy.sqlite*"))


def test_backup_cli_refuses_an_existing_file_and_says_what_else_to_keep(tmp_path):
    db = tmp_path / "out" / "results.sqlite"
    make_engine(db).dispose()  # a closed database: no -wal or -shm left
    dest = tmp_path / "b.sqlite"
    out = io.StringIO()
    assert main(["--db", str(db), "--output", str(tmp_path / "out"), "backup", str(dest)], out=out) == 0
    text = out.getvalue()
    assert "integrity ok" in text and "processed" in text and "heatmaps" in text and "csv" in text
    assert main(["--db", str(db), "backup", str(dest)], out=io.StringIO()) == 2
    assert main(["--db", str(db), "backup", str(dest), "--force"], out=io.StringIO()) == 0
    with pytest.raises(XRError, match="is the database itself"):
        backup(db, db, force=True)
    with pytest.raises(XRError, match="not found"):
        backup(tmp_path / "none.sqlite", tmp_path / "c.sqlite")


def test_postgresql_is_pointed_at_pg_dump_without_the_password(tmp_path, capsys):
    url = "postgresql+psycopg://xr:s3cret@db.example:5432/xr_results"
    assert main(["--db", url, "backup", str(tmp_path / "xr.dump")], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert f"pg_dump --format=custom --file {tmp_path / 'xr.dump'} postgresql://xr@db.example:5432/xr_results" in err
    assert "s3cret" not in err and "pg_restore" in err
