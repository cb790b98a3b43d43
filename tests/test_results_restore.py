"""Restore, as docs/operations.md ("Backup and restore") gives it. SQLite: ``xr-results backup``, the daemon
stopped, stale -wal/-shm removed, the copy put over the database; the daemon then goes on where the backup
left off (old rows there, the next id, CSVs not doubled). PostgreSQL: the exact ``pg_dump`` command that
``xr-results backup`` prints, ``pg_restore`` into a new database, every row read back with the current code."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shlex
import shutil
import subprocess
import uuid

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from xr.core.config import load_settings
from xr.core.logs import configure_logging
from xr.core.predict import Predictor
from xr.results.cli import main
from xr.results.engine import open_existing, session_factory
from xr.results.schema import Base, Result, Status


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu")


def _score(tmp_path, predictor, db: str | None = None) -> int:
    """One ``--once`` daemon run in this process, as the daemon's own stage tests run it."""
    from xr.daemon.service import Service

    cfg = load_settings(overrides={"daemon.heatmaps": "none", "daemon.stable_ms": 0})
    buf = io.StringIO()
    svc = Service(
        cfg,
        watch=tmp_path / "inbox",
        output=tmp_path / "out",
        db=db,
        once=True,
        predictor=predictor,
        log=configure_logging("json", stream=buf),
    )
    rc = svc.run()
    events = [json.loads(line) for line in buf.getvalue().splitlines() if line.startswith("{")]
    assert not [e for e in events if e["event"] in ("file_error", "stage_failed")], events
    return rc


def _rows(db) -> dict[int, Result]:
    engine = open_existing(db)
    try:
        with session_factory(engine)() as s:
            return {r.id: r for r in s.scalars(select(Result))}
    finally:
        engine.dispose()


def _csv_rows(csv_dir) -> list[tuple[int, str]]:
    got = []
    for f in sorted(csv_dir.glob("results-*.csv")):
        with open(f, newline="") as fh:
            got += [(int(r["id"]), r["filename"]) for r in csv.DictReader(fh)]
    return sorted(got)


def test_sqlite_restore_then_the_daemon_goes_on(tmp_path, predictor, xray_paths):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    db = out / "results.sqlite"
    for i in range(2):
        shutil.copy(xray_paths[i], inbox / f"a{i}.jpeg")
    assert _score(tmp_path, predictor) == 0
    before = {i: (r.filename, r.status, r.logit) for i, r in _rows(db).items()}
    assert len(before) == 2 and all(s == Status.OK for _, s, _ in before.values())

    # the backup: the database, then the files it points at (any file backup tool)
    backup = tmp_path / "backup"
    backup.mkdir()
    buf = io.StringIO()
    assert main(["--db", str(db), "--output", str(out), "backup", str(backup / "results.sqlite")], out=buf) == 0
    shutil.copytree(out / "csv", backup / "csv")

    # after the backup: a film scored, then the database lost (a daemon that died mid-write, say)
    shutil.copy(xray_paths[2], inbox / "late.jpeg")
    assert _score(tmp_path, predictor) == 0
    assert (out / "processed" / "late.jpeg").is_file() and len(_rows(db)) == 3
    (out / "results.sqlite-wal").write_bytes(b"stale log of the database being replaced")
    (out / "results.sqlite-shm").write_bytes(b"\0" * 64)

    # the restore, as docs/operations.md gives it: the daemon is stopped (--once has returned)
    for stale in ("results.sqlite-wal", "results.sqlite-shm"):
        (out / stale).unlink(missing_ok=True)
    shutil.copyfile(backup / "results.sqlite", db)
    db.chmod(0o600)
    shutil.rmtree(out / "csv")
    shutil.copytree(backup / "csv", out / "csv")  # the CSVs of the same backup
    # films scored after the backup have no row in the copy: back into the inbox, with a new one
    shutil.move(out / "processed" / "late.jpeg", inbox / "late.jpeg")
    shutil.copy(xray_paths[3], inbox / "new.jpeg")

    assert _score(tmp_path, predictor) == 0
    rows = _rows(db)
    assert {i: (r.filename, r.status, r.logit) for i, r in rows.items() if i in before} == before
    new = {r.filename: i for i, r in rows.items() if i not in before}
    assert sorted(new) == ["late.jpeg", "new.jpeg"] and sorted(new.values()) == [3, 4]  # the next ids
    assert all(rows[i].status == Status.OK for i in new.values())
    # every row once, as the database has it: none doubled, none left out
    assert _csv_rows(out / "csv") == sorted((i, r.filename) for i, r in rows.items())


def test_postgresql_restore_with_the_printed_pg_dump_into_a_new_database(tmp_path, predictor, xray_paths, pg_url):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(3):
        shutil.copy(xray_paths[i], inbox / f"a{i}.jpeg")
    assert _score(tmp_path, predictor, pg_url) == 0
    engine = open_existing(pg_url)
    with session_factory(engine).begin() as s:  # an error row too, not only ok ones
        s.execute(text("UPDATE results SET status = 'error', error = 'cannot decode' WHERE filename = 'a2.jpeg'"))
    engine.dispose()

    dump = tmp_path / "xr.dump"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["--db", pg_url, "backup", str(dump)], out=io.StringIO()) == 2
    (command,) = [line.strip() for line in err.getvalue().splitlines() if line.strip().startswith("pg_dump ")]
    subprocess.run(shlex.split(command), check=True, timeout=120)
    assert dump.is_file()

    u = make_url(pg_url)
    admin = create_engine(u.set(database="postgres"), isolation_level="AUTOCOMMIT")
    name = f"xr_restore_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    restored = u.set(database=name).render_as_string(hide_password=False)
    try:
        libpq = f"postgresql://{u.username}@{u.host}:{u.port or 5432}/{name}"
        # docs/operations.md: pg_restore --clean --if-exists --no-owner -d URL FILE
        subprocess.run(
            ["pg_restore", "--clean", "--if-exists", "--no-owner", "-d", libpq, str(dump)], check=True, timeout=120
        )
        src, dst = open_existing(pg_url), open_existing(restored)  # the current code's schema check passes
        try:
            for table in Base.metadata.sorted_tables:
                order = list(table.primary_key.columns) or list(table.columns)
                with src.connect() as a, dst.connect() as b:
                    want = a.execute(select(table).order_by(*order)).all()
                    got = b.execute(select(table).order_by(*order)).all()
                assert got == want, table.name
            with src.connect() as a:
                assert a.execute(select(Result.id)).all()
        finally:
            src.dispose()
            dst.dispose()
        # the daemon goes on on the restored database: the next id, none reused
        shutil.copy(xray_paths[3], inbox / "new.jpeg")
        assert _score(tmp_path, predictor, restored) == 0
        rows = _rows(restored)
        (new,) = [i for i, r in rows.items() if r.filename == "new.jpeg"]
        assert new == max(rows) and len(rows) == 4 and rows[new].status == Status.OK
    finally:
        with admin.connect() as c:
            c.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
