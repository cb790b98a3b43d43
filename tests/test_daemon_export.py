"""results/export.py: CSVs follow the DB in id order, rotate, never hold a row twice, never a half row."""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import os

import pytest
from sqlalchemy import update

from xr.results import engine, journal, schema
from xr.results.engine import make_engine, session_factory
from xr.results.export import CsvExporter, append_csv, last_id_in_csv, rows_to_csv
from xr.results.schema import Result, Status

_FILES = itertools.count()  # each row its own inbox file, as the daemon's are


def _add(sessions, n, status=Status.OK, flagged=False, day=1):
    t = dt.datetime(2026, 1, day, 12)
    with sessions.begin() as s:
        for _ in range(n):
            i = next(_FILES)
            s.add(
                Result(
                    path=f"/in/{i}.png",
                    filename=f"{i}.png",
                    size_bytes=1,
                    mtime_ns=i,
                    sha256=f"{i}",
                    status=status,
                    received_at=t,
                    claimed_at=t,
                    processed_at=t if status != Status.CLAIMED else None,
                    flagged=flagged,
                    probability=0.9 if flagged else 0.1,
                    error="bad\nline" if status == Status.ERROR else None,
                )
            )


def _ids(path):
    with open(path, newline="") as f:
        return [int(r["id"]) for r in csv.DictReader(f)]


def _died_before_db_update(sessions, last_id):
    """The DB's export mark as a process left it that died after writing CSVs, before recording them."""
    with sessions.begin() as s:
        engine.set_meta(s, "last_exported_id", last_id)


def _setup(tmp_path):
    eng = make_engine(tmp_path / "r.sqlite")
    return eng, session_factory(eng)


def test_daily_rotation_flagged_and_newlines(tmp_path):
    eng, sessions = _setup(tmp_path)
    _add(sessions, 2, day=1)
    _add(sessions, 1, day=2, flagged=True)
    _add(sessions, 1, status=Status.ERROR, day=2)
    _add(sessions, 1, status=Status.DUPLICATE, day=2, flagged=True)  # the flagged film again, under another name
    _add(sessions, 1, status=Status.DUPLICATE, day=2)
    ex = CsvExporter(tmp_path / "csv", sessions, "daily")
    assert ex.export() == 6
    assert _ids(tmp_path / "csv" / "results-2026-01-01.csv") == [1, 2]
    assert _ids(tmp_path / "csv" / "results-2026-01-02.csv") == [3, 4, 5, 6]
    assert _ids(tmp_path / "csv" / "flagged.csv") == [3, 5]
    assert "bad line" in (tmp_path / "csv" / "results-2026-01-02.csv").read_text()
    assert ex.export() == 0
    eng.dispose()


def test_row_rotation_and_restart(tmp_path):
    eng, sessions = _setup(tmp_path)
    _add(sessions, 5)
    ex = CsvExporter(tmp_path / "csv", sessions, "rows", max_rows=2)
    ex.export()
    files = sorted((tmp_path / "csv").glob("results-*.csv"))
    assert [f.name for f in files] == ["results-000001.csv", "results-000002.csv", "results-000003.csv"]
    assert [_ids(f) for f in files] == [[1, 2], [3, 4], [5]]
    _add(sessions, 2)
    ex2 = CsvExporter(tmp_path / "csv", sessions, "rows", max_rows=2)  # a restart
    ex2.export()
    assert [_ids(f) for f in sorted((tmp_path / "csv").glob("results-*.csv"))] == [[1, 2], [3, 4], [5, 6], [7]]
    eng.dispose()


def test_claimed_row_holds_back_later_rows(tmp_path):
    eng, sessions = _setup(tmp_path)
    _add(sessions, 1)
    _add(sessions, 1, status=Status.CLAIMED)
    _add(sessions, 1)
    ex = CsvExporter(tmp_path / "csv", sessions, "daily")
    assert ex.export() == 1  # id 3 waits for id 2
    with sessions.begin() as s:
        r = s.get(Result, 2)
        r.status, r.processed_at = Status.OK, dt.datetime(2026, 1, 1, 12)
    assert ex.export() == 2
    assert _ids(next((tmp_path / "csv").glob("results-*.csv"))) == [1, 2, 3]
    eng.dispose()


def test_crash_after_csv_before_db_update_writes_nothing_twice(tmp_path):
    eng, sessions = _setup(tmp_path)
    _add(sessions, 3)
    CsvExporter(tmp_path / "csv", sessions, "daily").export()
    _died_before_db_update(sessions, 1)
    ex = CsvExporter(tmp_path / "csv", sessions, "daily")
    assert ex.export() == 0 and ex.last_id == 3
    assert _ids(next((tmp_path / "csv").glob("results-*.csv"))) == [1, 2, 3]
    eng.dispose()


def _crash_on(monkeypatch, name):
    """append_csv that dies (like kill -9) when it reaches the file called ``name``."""
    import xr.results.export as export

    real = export.append_csv

    def append(path, text, header=""):
        if path.name == name:
            raise SystemExit("killed")
        real(path, text, header)

    monkeypatch.setattr(export, "append_csv", append)
    return lambda: monkeypatch.setattr(export, "append_csv", real)


def test_crash_between_files_of_one_update_loses_nothing(tmp_path, monkeypatch):
    """One update can write flagged.csv and two day files (rows finish out of order around midnight);
    a crash between any two writes leaves every row exactly once after the restart."""
    eng, sessions = _setup(tmp_path)
    _add(sessions, 1, day=1, flagged=True)  # id 1, day 1
    _add(sessions, 1, day=2, flagged=True)  # id 2, day 2
    _add(sessions, 1, day=1, flagged=True)  # id 3, day 1 (committed before id 2)
    for victim in ("results-2026-01-01.csv", "results-2026-01-02.csv", "flagged.csv"):
        for p in (tmp_path / "csv").glob("*.csv"):
            p.unlink()
        _died_before_db_update(sessions, 0)
        restore = _crash_on(monkeypatch, victim)
        try:
            CsvExporter(tmp_path / "csv", sessions, "daily").export()
        except SystemExit:
            pass
        restore()
        CsvExporter(tmp_path / "csv", sessions, "daily").export()  # the restart
        assert _ids(tmp_path / "csv" / "results-2026-01-01.csv") == [1, 3], victim
        assert _ids(tmp_path / "csv" / "results-2026-01-02.csv") == [2], victim
        assert _ids(tmp_path / "csv" / "flagged.csv") == [1, 2, 3], victim
    eng.dispose()


def test_rotation_change_does_not_rewrite_rows(tmp_path):
    eng, sessions = _setup(tmp_path)
    _add(sessions, 2)
    CsvExporter(tmp_path / "csv", sessions, "daily").export()
    _died_before_db_update(sessions, 0)  # the daily run
    _add(sessions, 1)
    CsvExporter(tmp_path / "csv", sessions, "rows", max_rows=10).export()
    assert _ids(tmp_path / "csv" / "results-2026-01-01.csv") == [1, 2]
    assert _ids(tmp_path / "csv" / "results-000001.csv") == [3]  # numbered files start at 1, not after the day file
    _add(sessions, 1)
    CsvExporter(tmp_path / "csv", sessions, "rows", max_rows=10).export()
    assert _ids(tmp_path / "csv" / "results-000001.csv") == [3, 4]
    eng.dispose()


def test_append_csv_appends_in_place_and_keeps_the_file_private(tmp_path):
    old = os.umask(0o022)
    try:
        p = tmp_path / "x.csv"
        append_csv(p, "1,a\n", header="id,v\n")
        ino = p.stat().st_ino
        os.chmod(p, 0o644)  # as an older version left it
        append_csv(p, "2,b\n", header="id,v\n")
    finally:
        os.umask(old)
    assert p.read_text() == "id,v\n1,a\n2,b\n"
    assert p.stat().st_ino == ino  # appended, not the whole file copied again
    assert p.stat().st_mode & 0o777 == 0o600
    assert last_id_in_csv(p) == 2 and not list(tmp_path.glob(".*.tmp"))


def test_a_line_cut_by_a_crash_is_not_a_row_and_is_dropped_before_the_next_append(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("id,v\n1,a\n2,b\n12")  # the crash came while "123,c" was being written
    assert last_id_in_csv(p) == 2  # "12" is not a whole line: it must not be read as id 12
    append_csv(p, "3,c\n", header="id,v\n")
    assert p.read_text() == "id,v\n1,a\n2,b\n3,c\n"
    p.write_text("id,")  # cut inside the header
    append_csv(p, "4,d\n", header="id,v\n")
    assert p.read_text() == "id,v\n4,d\n"


@pytest.mark.parametrize("name", ["=HYPERLINK(1).jpeg", "@SUM(1).jpeg", "+cmd.jpeg", "-2+3.jpeg", "\tx.png"])
def test_formula_like_cells_are_written_as_text(name):
    line = rows_to_csv(
        [{"filename": name, "probability": -0.5, "note": "-12.5"}],
        header=False,
        columns=("filename", "probability", "note"),
    )
    cells = next(csv.reader([line]))
    assert cells[0] == "'" + name
    assert cells[1:] == ["-0.5", "-12.5"]  # numbers stay numbers


def test_a_file_written_with_other_columns_is_set_aside_not_mixed(tmp_path):
    """After an upgrade adds a column, the day's file and flagged.csv written before it keep their header
    (renamed aside); the rows that follow go to a file whose header matches them, none twice."""
    eng, sessions = _setup(tmp_path)
    _add(sessions, 2, day=1, flagged=True)
    _add(sessions, 2, day=1)
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    old_header = "id,path,filename,status\n"
    for name, ids in (("results-2026-01-01.csv", [1, 2, 3]), ("flagged.csv", [1, 2])):
        (csv_dir / name).write_text(old_header + "".join(f"{i},/in/{i}.png,{i}.png,ok\n" for i in ids))
    _died_before_db_update(sessions, 2)  # row 3 reached the old file, the database does not know it
    assert CsvExporter(csv_dir, sessions, "daily").export() == 1
    assert _ids(csv_dir / "results-2026-01-01.old-columns.csv") == [1, 2, 3]
    assert _ids(csv_dir / "results-2026-01-01.csv") == [4]  # row 3 not written again
    assert (csv_dir / "results-2026-01-01.csv").read_text().startswith("id,path,filename,sha256,")
    assert _ids(csv_dir / "flagged.old-columns.csv") == [1, 2] and not (csv_dir / "flagged.csv").exists()
    _add(sessions, 1, day=1, flagged=True)
    CsvExporter(csv_dir, sessions, "daily").export()
    assert _ids(csv_dir / "flagged.csv") == [5] and _ids(csv_dir / "results-2026-01-01.csv") == [4, 5]
    eng.dispose()


# -- several workers on one PostgreSQL database ------------------------------------------------------------
def _two_workers_exported_two_rows(tmp_path, pg_url):
    """Two workers' exporters on one database and folder; the first is elected and has written rows 1-2."""
    eng = make_engine(pg_url)
    sessions = session_factory(eng)
    _add(sessions, 2)
    first = CsvExporter(tmp_path / "csv", sessions, "daily", elect=True)
    second = CsvExporter(tmp_path / "csv", sessions, "daily", elect=True)
    assert first.export() == 2
    return eng, sessions, first, second


def test_one_exporter_is_elected_and_another_takes_over_when_it_goes(tmp_path, pg_url):
    eng, sessions, first, second = _two_workers_exported_two_rows(tmp_path, pg_url)
    _add(sessions, 1)
    assert second.export() == 0  # not elected while the first holds the lock
    first.release()  # the first worker stops (or dies: its session ends the same way)
    assert second.export() == 1  # it takes over from the files and the database as the first left them
    assert _ids(next((tmp_path / "csv").glob("results-*.csv"))) == [1, 2, 3]
    second.release()
    eng.dispose()


def _lock_holders(eng) -> list[int]:
    """Backend pids holding the exporter's advisory lock in this database (other tests on the server hold their
    own), read from pg_locks (a bigint key is classid:objid)."""
    from sqlalchemy import text

    from xr.results.export import EXPORTER_LOCK

    with eng.connect() as c:
        return list(
            c.execute(
                text(
                    "select pid from pg_locks where locktype = 'advisory' and granted"
                    " and database = (select oid from pg_database where datname = current_database())"
                    " and ((classid::bigint << 32) | objid::bigint) = :key"
                ),
                {"key": EXPORTER_LOCK},
            ).scalars()
        )


def _wait(pred, what: str) -> None:
    import time

    deadline = time.monotonic() + 30
    while not pred():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def _end_session(eng, pid: int) -> None:
    """The server ends one backend (a restart, a cut connection, an idle timeout): its locks go with it."""
    from sqlalchemy import text

    with eng.connect() as c:
        assert c.execute(text("select pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    _wait(lambda: pid not in _lock_holders(eng), f"backend {pid} to end")


def test_an_exporter_whose_session_the_server_ended_notices_and_is_elected_again(tmp_path, pg_url):
    """No patching: the server ends the elected exporter's session; at its next export it finds the lock gone,
    is elected again on a new session while no one else holds it, and stands aside while another does."""
    eng, sessions, first, second = _two_workers_exported_two_rows(tmp_path, pg_url)
    (holder,) = _lock_holders(eng)
    _end_session(eng, holder)
    assert _lock_holders(eng) == []
    _add(sessions, 1)
    assert first.export() == 1  # noticed, elected again, wrote row 3
    (again,) = _lock_holders(eng)
    assert again != holder  # a new session holds the lock ...
    assert second.export() == 0 and not second.elected()  # ... and it is the first worker's
    _end_session(eng, again)
    _add(sessions, 2)
    assert second.export() == 2  # the lock is free: the second worker takes over, rows 4-5
    assert first.export() == 0 and not first.elected()  # the first notices it lost it and stands aside
    assert len(_lock_holders(eng)) == 1
    second.release()
    _add(sessions, 1)
    assert first.export() == 1  # the second went: the first is elected again
    assert _ids(next((tmp_path / "csv").glob("results-*.csv"))) == [1, 2, 3, 4, 5, 6]
    first.release()
    _wait(lambda: _lock_holders(eng) == [], "the released lock to go")  # the server ends the session after we close it
    eng.dispose()


def test_an_exporter_that_lost_its_lock_after_checking_it_writes_nothing_twice(tmp_path, pg_url, monkeypatch):
    """A worker checks it is the exporter (the real check, on the real lock), then the server ends its session
    while another is elected and writes: its update, arriving late, must not append those rows again."""
    from sqlalchemy import select

    eng, sessions, first, second = _two_workers_exported_two_rows(tmp_path, pg_url)
    check = first.elected
    wrote_meanwhile = []

    def checked_then_lost() -> bool:
        ok = check()  # holds the lock: True
        (holder,) = _lock_holders(eng)
        _end_session(eng, holder)  # ... lost right after the check
        wrote_meanwhile.append(second.export())  # another worker is elected and exports meanwhile
        return ok

    _add(sessions, 3)
    monkeypatch.setattr(first, "elected", checked_then_lost)
    assert first.export() == 0  # its late update finds the rows written
    assert wrote_meanwhile == [3]
    monkeypatch.setattr(first, "elected", check)
    assert first.export() == 0 and not first.elected()  # the real check: the lock is the second's now
    _add(sessions, 1, flagged=True)
    with sessions.begin() as s:  # one exporter in the middle of an update holds the mark ...
        s.execute(select(schema.Meta).where(schema.Meta.key == "last_exported_id").with_for_update())
        assert second.export() == 0  # ... the other does not write meanwhile
    assert second.export() == 1 and first.export() == 0
    csv_dir = tmp_path / "csv"
    assert _ids(next(csv_dir.glob("results-*.csv"))) == [1, 2, 3, 4, 5, 6]
    assert _ids(csv_dir / "flagged.csv") == [6]
    second.release()
    eng.dispose()


def test_a_claim_in_flight_with_a_lower_id_holds_back_later_rows(tmp_path, pg_url):
    """A sequence hands out ids outside transactions: a claim not yet committed may hold a lower id than a
    row already final. The exporter waits for claims in flight, so that row is not skipped for ever."""
    import threading

    eng = make_engine(pg_url)
    sessions = session_factory(eng)
    now = dt.datetime(2026, 1, 1, 12)
    row = {
        "filename": "x.png",
        "size_bytes": 1,
        "mtime_ns": 1,
        "status": Status.CLAIMED,
        "received_at": now,
        "claimed_at": now,
    }
    slow = sessions()
    journal.claim_fence(slow)
    low = journal.try_claim(slow, {"path": "/in/slow.png", **row})  # worker A: claimed, not committed yet
    with sessions.begin() as s:  # worker B: a later id, committed and final
        journal.claim_fence(s)
        high = journal.try_claim(s, {"path": "/in/fast.png", **row})
        s.execute(update(Result).where(Result.id == high).values(status=Status.OK, processed_at=now))
    assert low < high
    ex = CsvExporter(tmp_path / "csv", sessions, "daily", elect=True)
    exported = []
    t = threading.Thread(target=lambda: exported.append(ex.export()))
    t.start()
    t.join(0.5)
    slow.commit()  # A's claim lands; the exporter, waiting on it, now sees id `low` claimed
    slow.close()
    t.join(60)
    assert exported == [0]  # `high` waits for `low`, as on SQLite
    with sessions.begin() as s:
        s.execute(update(Result).where(Result.id == low).values(status=Status.OK, processed_at=now))
    assert ex.export() == 2
    assert _ids(next((tmp_path / "csv").glob("results-*.csv"))) == [low, high]
    ex.release()
    eng.dispose()


# -- reviews.csv ---------------------------------------------------------------------------------------------
def _review(sessions, result_id: int, decision: str = "pneumonia") -> int:
    with sessions.begin() as s:
        r = schema.Review(result_id=result_id, decision=decision, reviewed_at=dt.datetime(2026, 1, 1, 13))
        s.add(r)
        s.flush()
        return r.id


def test_a_reviews_csv_write_that_fails_after_the_commit_is_caught_up_once(tmp_path, monkeypatch):
    """xr-review commits a review, then appends it to reviews.csv. When that write fails (a full disk), the
    review stands in the database and the next export writes it, once, with the ones after it: a caller that
    answers the reader normally need not (and must not) record the review again."""
    import pytest

    import xr.results.export as export

    eng, sessions = _setup(tmp_path)
    _add(sessions, 1, flagged=True)
    csv_dir = tmp_path / "csv"
    assert _review(sessions, 1) == 1 and export.export_reviews(csv_dir, sessions) == 1

    def full_disk(path, text, header=""):
        raise OSError(28, "No space left on device")

    _review(sessions, 1, "normal")
    real = export.append_csv
    monkeypatch.setattr(export, "append_csv", full_disk)
    with pytest.raises(OSError):
        export.export_reviews(csv_dir, sessions)
    monkeypatch.setattr(export, "append_csv", real)
    assert _ids(csv_dir / "reviews.csv") == [1]  # the file as before the failed write
    _review(sessions, 1)
    assert export.export_reviews(csv_dir, sessions) == 2
    assert export.export_reviews(csv_dir, sessions) == 0
    assert _ids(csv_dir / "reviews.csv") == [1, 2, 3]
    eng.dispose()
