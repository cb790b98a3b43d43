"""score/ (``xr-score``): bulk scoring on a local Ray, resumable Parquet, ``xr-results import``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xr.core.errors import XRError
from xr.score import bulk

_SCRIPT = Path(sys.executable).parent / "xr-score"
SCORE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "xr.score.cli"]


def _folder(tmp: Path, xray_paths: list[Path], n: int) -> Path:
    """NORMAL/ and PNEUMONIA/ with ``n`` distinct films, plus two files that cannot be read."""
    data = tmp / "data"
    for i in range(n):
        src = xray_paths[i % len(xray_paths)]
        dst = data / src.parent.name / f"{i:04d}-{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes() + f"xr-tag-{i}".encode())
    (data / "NORMAL" / "cut.jpeg").write_bytes(xray_paths[0].read_bytes()[:300])  # truncated
    (data / "NORMAL" / "notes.png").write_text("not an image")
    return data


def _table(out: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))]).to_pylist()


def test_the_missing_extra_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(XRError, match=r"pip install 'xr-triage\[cluster\]'"):
        bulk._import_ray()


def test_inputs_are_the_files_the_daemon_reads(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("x.PNG", "a/y.jpeg", "a/b/z.dcm", "notes.txt", ".hidden.png", "copy.png.part"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a" / "EXPORT1").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 8)  # DICOM without an extension
    (tmp_path / "a" / "README").write_bytes(b"hello")
    found = [Path(p).relative_to(tmp_path).as_posix() for p in bulk.list_inputs(tmp_path)]
    assert found == ["x.PNG", "a/EXPORT1", "a/y.jpeg", "a/b/z.dcm"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# chosen\n{tmp_path / 'x.PNG'}\n\n{tmp_path / 'a' / 'y.jpeg'}\n")
    assert bulk.list_inputs(listing) == [str(tmp_path / "x.PNG"), str(tmp_path / "a" / "y.jpeg")]
    with pytest.raises(XRError, match="no such folder or list file"):
        bulk.list_inputs(tmp_path / "missing")


@pytest.mark.slow
def test_scores_equal_evaluate_and_bad_files_are_rows(tmp_path, tiny_checkpoint, xray_paths):
    import csv

    data = _folder(tmp_path, xray_paths, 24)
    out = tmp_path / "scores"
    res = subprocess.run(
        [*SCORE, "--data", str(data), "--out", str(out), "--model", str(tiny_checkpoint), "--batch-size", "8"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "26 files scored" in res.stdout and "2 errors" in res.stdout
    rows = {r["path"]: r for r in _table(out)}
    assert len(rows) == 26
    cut, notes = rows[str(data / "NORMAL" / "cut.jpeg")], rows[str(data / "NORMAL" / "notes.png")]
    assert cut["probability"] is None and cut["error"]
    assert notes["probability"] is None and notes["error"]
    good = tmp_path / "good"  # evaluate refuses a labelled set with unreadable files: the same films without them
    shutil.copytree(data, good, ignore=shutil.ignore_patterns("cut.jpeg", "notes.png"))
    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "xr.train.cli",
            "evaluate",
            "--data",
            str(good),
            "--model",
            str(tiny_checkpoint),
            "--out",
            str(tmp_path / "eval"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        expected = {
            str(data / Path(r["path"]).resolve().relative_to(good)): float(r["probability"]) for r in csv.DictReader(f)
        }
    assert len(expected) == 24
    for path, prob in expected.items():
        assert rows[path]["probability"] == pytest.approx(prob, abs=1e-3), path
        assert rows[path]["sha256"] and rows[path]["error"] is None


@pytest.mark.slow
def test_a_site_calibration_is_honoured_and_import_loads_the_run(tmp_path, tiny_checkpoint, xray_paths):
    from sqlalchemy import select

    from xr.core.calibration import Calibration
    from xr.core.model import file_sha256
    from xr.results.engine import make_engine, session_factory
    from xr.results.schema import Result

    site = Calibration(
        temperature=0.8, shift=-0.5, threshold=0.3, kind="site", model_sha256=file_sha256(tiny_checkpoint)
    )
    site.write(tmp_path / "site.json")
    data = _folder(tmp_path, xray_paths, 6)
    out = tmp_path / "scores"
    res = subprocess.run(
        [
            *SCORE,
            "--data",
            str(data),
            "--out",
            str(out),
            "--model",
            str(tiny_checkpoint),
            "--calibration",
            str(tmp_path / "site.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _table(out)
    assert {(r["calibration_id"], r["threshold"]) for r in rows} == {(site.id, 0.3)}
    other = subprocess.run(
        [*SCORE, "--data", str(data), "--out", str(out), "--model", str(tiny_checkpoint)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert other.returncode == 2 and "use another --out" in other.stderr  # one run, one calibration
    db = tmp_path / "results.sqlite"
    for _ in range(2):  # a second import adds nothing
        imp = subprocess.run(
            [sys.executable, "-m", "xr.results.cli", "--db", str(db), "import", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert imp.returncode == 0, imp.stderr
    assert "imported 0 rows" in imp.stdout and "(8 already there)" in imp.stdout
    eng = make_engine(db, create=False)
    with session_factory(eng)() as s:
        got = {r.path: r for r in s.scalars(select(Result))}
    eng.dispose()
    assert len(got) == 8
    for r in rows:
        row = got[r["path"]]
        assert row.worker_id == "xr-score" and row.calibration_id == site.id and row.moved_at is not None
        assert row.status == ("ok" if r["error"] is None else "error")
        assert row.probability == r["probability"]


@pytest.mark.slow
def test_kill9_mid_run_then_the_same_command_scores_every_file_once(tmp_path, tiny_checkpoint, xray_paths):
    data = _folder(tmp_path, xray_paths, 400)
    out = tmp_path / "scores"
    cmd = [
        *SCORE,
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        str(tiny_checkpoint),
        "--part-rows",
        "16",
        "--batch-size",
        "8",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while len(list(out.glob("part-*.parquet"))) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "no progress before the kill"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    partial = len(_table(out))
    assert 0 < partial < 402
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{partial} already in" in res.stdout
    paths = [r["path"] for r in _table(out)]
    assert len(paths) == len(set(paths)) == 402
    assert not list(out.glob(".part-*"))


@pytest.mark.slow
def test_dicom_films_are_scored_and_objects_out_of_scope_say_why(tmp_path, tiny_checkpoint, dicom_dir):
    data = tmp_path / "archive"
    data.mkdir()
    for key in ("native", "mono2", "knee", "sr"):
        shutil.copy(dicom_dir[key], data / f"{key}.dcm")
    shutil.copy(dicom_dir["native"], data / "EXPORT0001")  # an exporter's file without an extension
    out = tmp_path / "scores"
    res = subprocess.run(
        [*SCORE, "--data", str(data), "--out", str(out), "--model", str(tiny_checkpoint)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in _table(out)}
    assert set(rows) == {"native.dcm", "mono2.dcm", "knee.dcm", "sr.dcm", "EXPORT0001"}
    assert rows["native.dcm"]["probability"] == pytest.approx(rows["mono2.dcm"]["probability"], abs=0.02)
    assert rows["EXPORT0001"]["probability"] == rows["native.dcm"]["probability"]
    assert rows["knee.dcm"]["error"].startswith("skipped: BodyPartExamined KNEE")
    assert rows["sr.dcm"]["error"].startswith("skipped: Modality SR")
