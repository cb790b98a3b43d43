"""results/cli.py: list filters, formats and stats on a synthetic database."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pytest

from xr.results import schema
from xr.results.cli import main, parse_since, percentile
from xr.results.engine import make_engine, session_factory
from xr.results.schema import Result, Status


@pytest.fixture()
def out_dir(tmp_path):
    out = tmp_path / "out"
    eng = make_engine(out / "results.sqlite")
    t0 = dt.datetime(2026, 1, 1, 12)
    with session_factory(eng).begin() as s:
        for i in range(10):
            status = Status.ERROR if i == 3 else Status.DUPLICATE if i == 4 else Status.OK
            s.add(
                Result(
                    path=f"/in/{i}.png",
                    filename=f"{i}.png",
                    size_bytes=1,
                    mtime_ns=i,
                    sha256=str(i),
                    status=status,
                    error="empty file (0 bytes)" if status == Status.ERROR else None,
                    received_at=t0 + dt.timedelta(seconds=i),
                    claimed_at=t0,
                    processed_at=t0 + dt.timedelta(seconds=i + 1),
                    latency_ms=1000.0 + i,
                    probability=0.9 if i % 2 else 0.1,
                    flagged=bool(i % 2) if status != Status.ERROR else None,
                )
            )
        # a flagged film dropped again under another name: flagged like its first result
        s.add(
            Result(
                path="/in/d.png",
                filename="d.png",
                size_bytes=1,
                mtime_ns=1,
                sha256="1",
                status=Status.DUPLICATE,
                duplicate_of=2,
                received_at=t0 + dt.timedelta(seconds=4),
                claimed_at=t0,
                processed_at=t0 + dt.timedelta(seconds=5),
                latency_ms=1004.5,
                probability=0.9,
                flagged=True,
            )
        )
        s.add(
            Result(
                path="/in/c.png",
                filename="c.png",
                size_bytes=1,
                mtime_ns=1,
                status=Status.CLAIMED,
                received_at=t0,
                claimed_at=t0,
            )
        )
    eng.dispose()
    return out


def run(*argv):
    buf = io.StringIO()
    rc = main(list(argv), out=buf)
    return rc, buf.getvalue()


def test_list_filters_and_formats(out_dir):
    rc, text = run("--output", str(out_dir), "--flagged", "--format", "json")
    rows = json.loads(text)
    assert rc == 0 and [r["filename"] for r in rows] == ["1.png", "5.png", "7.png", "9.png", "d.png"]
    assert rows[-1]["status"] == "duplicate" and rows[-1]["duplicate_of"] == 2
    rc, text = run("list", "--output", str(out_dir), "--status", "error", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["error"] for r in rows] == ["empty file (0 bytes)"]
    rc, text = run("list", "--output", str(out_dir), "--limit", "2")
    lines = text.strip().splitlines()
    assert lines[0].split()[:3] == ["id", "processed_at", "filename"] and len(lines) == 3
    assert "c.png" in lines[-1]  # newest rows
    rc, text = run("--output", str(out_dir), "--since", "2026-01-01T12:00:08Z", "--format", "json")
    assert [r["filename"] for r in json.loads(text)] == ["7.png", "8.png", "9.png"]


def test_stats(out_dir):
    rc, text = run("stats", "--output", str(out_dir), "--format", "json")
    st = json.loads(text)
    assert st["by_status"] == {"claimed": 1, "ok": 8, "error": 1, "duplicate": 2, "skipped": 0}
    assert st["flagged"] == 5 and st["flagged_rate"] == pytest.approx(5 / 10)  # of the rows with a score
    assert st["throughput_files_per_s"] == pytest.approx(11 / 10)
    assert st["latency_ms_p50"] == pytest.approx(1004.5)
    rc, text = run("stats", "--output", str(out_dir))
    assert rc == 0 and "latency_ms_p95" in text


def test_missing_db_and_helpers(tmp_path, capsys):
    rc, _ = run("--db", str(tmp_path / "nope.sqlite"))
    assert rc == 2 and "not found" in capsys.readouterr().err
    assert percentile([], 0.5) is None and percentile([1, 2, 3], 0.5) == 2
    assert (dt.datetime.utcnow() - parse_since("2h")).total_seconds() == pytest.approx(7200, abs=5)


def test_since_includes_claimed_rows_received_in_the_window_and_limit_must_be_positive(out_dir, capsys):
    rc, text = run(
        "--output", str(out_dir), "--status", "claimed", "--since", "2026-01-01T11:00:00Z", "--format", "json"
    )
    assert rc == 0 and [r["filename"] for r in json.loads(text)] == ["c.png"]  # as `stats --since` counts it
    for bad in ("0", "-3", "x"):
        with pytest.raises(SystemExit):
            run("--output", str(out_dir), "--limit", bad)
        assert "expected a whole number >= 1" in capsys.readouterr().err


def test_reader_url_query_and_files_that_are_not_results(out_dir, tmp_path, capsys):
    url = f"sqlite:///file:{out_dir / 'results.sqlite'}?mode=ro&uri=true"  # SQLite's read-only URI form
    rc, text = run("--db", url, "--format", "json")
    assert rc == 0 and len(json.loads(text)) == 12
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    rc, _ = run("--db", str(empty))
    assert rc == 2 and "not an xr-triage results database" in capsys.readouterr().err
    assert empty.stat().st_size == 0  # a reader never rewrites the file it was pointed at


def test_stats_refuses_list_filters_instead_of_ignoring_them(out_dir, capsys):
    with pytest.raises(SystemExit):
        run("--output", str(out_dir), "--flagged", "stats")
    assert "--flagged only apply to list" in capsys.readouterr().err


def test_table_shows_a_whole_sha256_and_marks_what_it_cuts(tmp_path):
    """A value copied from the table is either whole or visibly cut: never a silently shortened hash or path."""
    out = tmp_path / "out"
    eng = make_engine(out / "results.sqlite")
    sha = "ab" * 32
    path = "/inbox/" + "deep/" * 20 + "film.png"
    t0 = dt.datetime(2026, 1, 1, 12)
    with session_factory(eng).begin() as s:
        s.add(
            Result(
                path=path,
                filename="film.png",
                size_bytes=1,
                mtime_ns=1,
                sha256=sha,
                status=Status.OK,
                received_at=t0,
                claimed_at=t0,
                processed_at=t0,
                probability=0.5,
                flagged=True,
            )
        )
    eng.dispose()
    rc, text = run("--output", str(out), "--all-columns")
    assert rc == 0 and sha in text.split()
    cut = next(w for w in text.split() if w.startswith("/inbox/"))
    assert cut.endswith("...") and path.startswith(cut[:-3]) and len(cut) == 64


def test_stats_watch_drift_per_calibration(tmp_path, capsys):
    import numpy as np

    from xr.core.calibration import reference

    out = tmp_path / "out"
    eng = make_engine(out / "results.sqlite")
    rng = np.random.default_rng(0)

    def scores(n, shift=0.0):
        y = rng.random(n) < 0.6
        return np.clip(np.where(y, rng.beta(8, 1.5, n), rng.beta(1.5, 8, n)) + shift, 0, 1)

    t0 = dt.datetime(2026, 1, 1, 12)
    with session_factory(eng).begin() as s:
        for cid in ("validation-aaaaaaaaaaaa", "site-bbbbbbbbbbbb"):
            s.add(
                schema.CalibrationRecord(
                    id=cid,
                    model_id="m",
                    kind=cid.split("-")[0],
                    path=None,
                    temperature=1.0,
                    shift=0.0,
                    threshold=0.5,
                    reference=json.dumps(reference(scores(700), 0.5)),
                    first_used_at=t0,
                )
            )
        rows = [("validation-aaaaaaaaaaaa", p) for p in scores(300)] + [
            ("site-bbbbbbbbbbbb", p) for p in scores(300, 0.3)
        ]
        for i, (cid, p) in enumerate(rows):
            s.add(
                Result(
                    path=f"/in/{i}.png",
                    filename=f"{i}.png",
                    size_bytes=1,
                    mtime_ns=i,
                    status=Status.OK,
                    probability=float(p),
                    flagged=bool(p >= 0.5),
                    calibration_id=cid,
                    received_at=t0,
                    claimed_at=t0,
                    processed_at=t0,
                )
            )
    eng.dispose()
    rc, text = run("stats", "--output", str(out), "--format", "json")
    drift = json.loads(text)["drift"]
    assert (
        rc == 0
        and drift["validation-aaaaaaaaaaaa"]["warning"] is False
        and drift["site-bbbbbbbbbbbb"]["warning"] is True
    )
    assert drift["site-bbbbbbbbbbbb"]["n"] == 300 and drift["site-bbbbbbbbbbbb"]["psi"] > 0.25
    err = capsys.readouterr().err
    assert "warning: drift for calibration site-bbbbbbbbbbbb: " in err and "score distribution moved (PSI" in err
    assert "validation-aaaaaaaaaaaa" not in err and "xr-train site-calibrate" in err
    rc, text = run("stats", "--output", str(out))  # the table shows it too
    assert "drift.site-bbbbbbbbbbbb.warning" in text and "drift.validation-aaaaaaaaaaaa.psi" in text


def test_reviews_are_listed_with_their_films(out_dir):
    eng = make_engine(out_dir / "results.sqlite")
    with session_factory(eng).begin() as s:
        s.add(
            schema.Review(
                result_id=2, decision="pneumonia", note="RLL", reviewer="Dr. A", reviewed_at=dt.datetime(2026, 1, 2)
            )
        )
        s.add(schema.Review(result_id=6, decision="normal", reviewer=None, reviewed_at=dt.datetime(2026, 1, 3)))
    eng.dispose()
    rc, text = run("reviews", "--output", str(out_dir), "--format", "json")
    rows = json.loads(text)
    assert rc == 0 and [(r["filename"], r["decision"], r["reviewer"], r["audit"]) for r in rows] == [
        ("1.png", "pneumonia", "Dr. A", False),
        ("5.png", "normal", None, False),
    ]
    rc, text = run("reviews", "--output", str(out_dir), "--since", "2026-01-03T00:00:00Z")
    assert (
        rc == 0
        and "5.png" in text
        and "1.png" not in text
        and text.splitlines()[0].split()[:3] == ["id", "reviewed_at", "result_id"]
    )


def _add_row(out_dir, **fields):
    eng = make_engine(out_dir / "results.sqlite")
    t0 = dt.datetime(2026, 1, 2, 12)
    row = {"path": "/in/x.dcm", "filename": "x.dcm", "size_bytes": 1, "mtime_ns": 99, "sha256": "x"}
    row |= {"status": Status.OK, "received_at": t0, "claimed_at": t0, "processed_at": t0}
    row |= {"probability": 0.2, "flagged": False}
    row.update(fields)
    with session_factory(eng).begin() as s:
        s.add(Result(**row))
    eng.dispose()


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_list_leaves_out_dicom_identifiers_where_the_operator_opted_out(out_dir, tmp_path, fmt):
    _add_row(out_dir, patient_id="PAT-123", accession_number="ACC-9", study_instance_uid="1.2.3")
    config = tmp_path / "config.yaml"
    config.write_text("csv:\n  dicom_identifiers: false\n")
    rc, text = run("list", "--output", str(out_dir), "--config", str(config), "--format", fmt)
    assert rc == 0 and "x.dcm" in text
    assert "PAT-123" not in text and "ACC-9" not in text and "patient_id" not in text
    rc, text = run("list", "--output", str(out_dir), "--format", fmt)  # the default shows them
    assert "PAT-123" in text and "patient_id" in text


def test_list_writes_formula_like_names_as_text_and_escapes_terminal_controls(out_dir):
    _add_row(out_dir, filename="=HYPERLINK(1).jpeg", error="\x1b]0;owned\x07 bad", status=Status.ERROR)
    rc, text = run("list", "--output", str(out_dir), "--status", "error", "--format", "csv")
    names = [r["filename"] for r in csv.DictReader(io.StringIO(text))]
    assert "'=HYPERLINK(1).jpeg" in names
    rc, text = run("list", "--output", str(out_dir), "--status", "error")
    assert "\x1b" not in text and "\x07" not in text and "\\x1b]0;owned\\x07" in text


def test_a_database_password_is_never_printed(capsys):
    rc = main(["list", "--db", "postgresql+psycopg://xr:s3cret-pw@127.0.0.1:1/results"], out=io.StringIO())
    err = capsys.readouterr().err
    assert rc == 2 and "s3cret-pw" not in err and "xr:***@127.0.0.1:1" in err
