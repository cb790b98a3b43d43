"""score/ (``xr-score``): bulk scoring on Ray Data, resumable Parquet, ``xr-results import``.

One local Ray serves the whole module (``local_ray``); xr-score and xr-results run in this process
(``main(argv)``) except where a kill is under test. Scores are checked against the daemon's own decode and
forward bit for bit: the CPU forward gives the same logits for a film whatever its batch."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xr.core.errors import XRError
from xr.score import bulk

_SCRIPT = Path(sys.executable).parent / "xr-score"
SCORE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "xr.score.cli"]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (a start-up costs seconds): its address, for a process that joins it."""
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ctx.address_info["address"]
    ray.shutdown()


def _score(capsys, *argv: str) -> tuple[int, str, str]:
    """xr-score in this process (it joins the running Ray): exit code, stdout, stderr."""
    from xr.score.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    said = capsys.readouterr()
    return rc, said.out, said.err


def _expected_logits(checkpoint: Path, paths) -> dict[str, float]:
    """The daemon's decode and eager forward, one film at a time: what xr-score must give to the bit."""

    from xr.core.predict import Predictor

    pred = Predictor.from_checkpoint(checkpoint, device="cpu")
    return {str(p): float(pred.logits(pred.pixels(p)[None])[0]) for p in paths}


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
def test_scores_equal_the_daemons_and_evaluates_and_bad_files_are_rows(
    tmp_path, tiny_checkpoint, xray_paths, local_ray, capsys, monkeypatch
):
    import csv

    from xr.train import cli as train_cli

    data = _folder(tmp_path, xray_paths, 24)
    out = tmp_path / "scores"
    rc, said, err = _score(capsys, "--data", data, "--out", out, "--model", tiny_checkpoint, "--batch-size", "8")
    assert rc == 0, err[-3000:]
    assert "26 files scored" in said and "2 errors" in said
    rows = {r["path"]: r for r in _table(out)}
    assert len(rows) == 26
    cut, notes = rows[str(data / "NORMAL" / "cut.jpeg")], rows[str(data / "NORMAL" / "notes.png")]
    assert cut["probability"] is None and cut["logit"] is None and cut["error"]
    assert notes["probability"] is None and notes["logit"] is None and notes["error"]
    films = sorted(p for p in rows if not p.endswith(("cut.jpeg", "notes.png")))
    expected = _expected_logits(tiny_checkpoint, films)
    for path in films:
        assert rows[path]["logit"] == expected[path], path  # bit for bit: the same decode and forward
        assert rows[path]["sha256"] and rows[path]["error"] is None
    # xr-train evaluate on the same films (it refuses unreadable files: a copy without them) agrees
    good = tmp_path / "good"
    shutil.copytree(data, good, ignore=shutil.ignore_patterns("cut.jpeg", "notes.png"))
    monkeypatch.setattr(train_cli, "tune_malloc", lambda: False)
    capsys.readouterr()
    assert (
        train_cli.main(
            ["evaluate", "--data", str(good), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "eval")]
        )
        == 0
    ), capsys.readouterr().err[-3000:]
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        evaluated = {str(data / Path(r["path"]).resolve().relative_to(good)): r for r in csv.DictReader(f)}
    assert sorted(evaluated) == films
    for path, r in evaluated.items():  # evaluate writes 6 decimals
        assert rows[path]["logit"] == pytest.approx(float(r["logit"]), abs=1e-6), path
        assert rows[path]["probability"] == pytest.approx(float(r["probability"]), abs=1e-6), path


@pytest.mark.slow
def test_a_site_calibration_is_honoured_and_import_loads_the_run(
    tmp_path, tiny_checkpoint, xray_paths, local_ray, capsys
):
    from sqlalchemy import select

    from xr.core.calibration import Calibration
    from xr.core.model import file_sha256
    from xr.results.cli import main as xr_results
    from xr.results.engine import make_engine, session_factory
    from xr.results.schema import Result

    site = Calibration(
        temperature=0.8, shift=-0.5, threshold=0.3, kind="site", model_sha256=file_sha256(tiny_checkpoint)
    )
    site.write(tmp_path / "site.json")
    data = _folder(tmp_path, xray_paths, 6)
    out = tmp_path / "scores"
    args = ("--data", data, "--out", out, "--model", tiny_checkpoint)
    rc, _, err = _score(capsys, *args, "--calibration", tmp_path / "site.json")
    assert rc == 0, err[-3000:]
    rows = _table(out)
    assert {(r["calibration_id"], r["threshold"]) for r in rows} == {(site.id, 0.3)}
    for r in rows:  # the site's recalibration of each logit, and its threshold
        if r["error"] is None:
            assert r["probability"] == pytest.approx(1 / (1 + np.exp(-(r["logit"] / 0.8 - 0.5))), abs=1e-6)
            assert r["flagged"] == (r["probability"] >= 0.3)
    rc, _, err = _score(capsys, *args)
    assert rc == 2 and "use another --out" in err  # one run, one calibration
    db = tmp_path / "results.sqlite"
    for _ in range(2):  # a second import adds nothing
        capsys.readouterr()
        assert xr_results(["--db", str(db), "import", str(out)]) == 0
    said = capsys.readouterr().out
    assert "imported 0 rows" in said and "(8 already there)" in said
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
def test_kill9_mid_run_then_the_same_command_scores_every_file_once(
    tmp_path, tiny_checkpoint, xray_paths, local_ray, capsys
):
    """The driver killed mid-run (a process of its own, on the module's Ray), then the same command again."""
    data = _folder(tmp_path, xray_paths, 160)
    out = tmp_path / "scores"
    args = ["--data", str(data), "--out", str(out), "--model", str(tiny_checkpoint), "--part-rows", "16"]
    args += ["--batch-size", "8"]
    proc = subprocess.Popen(
        [*SCORE, *args, "--address", local_ray],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while len(list(out.glob("part-*.parquet"))) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "no progress before the kill"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9 mid-run: Ray ends the dead driver's actors
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    partial = len(_table(out))
    assert 0 < partial < 162
    rc, said, err = _score(capsys, *args)
    assert rc == 0, err[-3000:]
    assert f"{partial} already in" in said
    paths = [r["path"] for r in _table(out)]
    assert len(paths) == len(set(paths)) == 162
    assert not list(out.glob(".part-*"))


@pytest.mark.slow
def test_dicom_films_are_scored_and_objects_out_of_scope_say_why(
    tmp_path, tiny_checkpoint, dicom_dir, local_ray, capsys
):
    from xr.core.intake import DEFAULT_LIMITS
    from xr.core.predict import Predictor
    from xr.core.preprocessing import Preset

    data = tmp_path / "archive"
    data.mkdir()
    for key in ("native", "mono2", "knee", "sr"):
        shutil.copy(dicom_dir[key], data / f"{key}.dcm")
    shutil.copy(dicom_dir["native"], data / "EXPORT0001")  # an exporter's file without an extension
    out = tmp_path / "scores"
    rc, _, err = _score(capsys, "--data", data, "--out", out, "--model", tiny_checkpoint)
    assert rc == 0, err[-3000:]
    rows = {Path(r["path"]).name: r for r in _table(out)}
    assert set(rows) == {"native.dcm", "mono2.dcm", "knee.dcm", "sr.dcm", "EXPORT0001"}
    # Pixels: the MONOCHROME1 film is shown as its MONOCHROME2 twin (stored values inverted) is, within a grey
    # level on average (the displays differ by at most 1 before resizing); un-inverted it would be the negative.
    preset = Preset.from_dict(Predictor.from_checkpoint(tiny_checkpoint, device="cpu").meta["preprocess"])
    native, mono2 = (
        bulk.decode_file(str(data / f"{k}.dcm"), preset, DEFAULT_LIMITS)[1].astype(int) for k in ("native", "mono2")
    )
    assert np.abs(native - mono2).mean() < 1 and np.abs((255 - native) - mono2).mean() > 30
    # Scores: each film's logit is the daemon's to the bit; the twins score alike because their pixels do
    expected = _expected_logits(tiny_checkpoint, [data / "native.dcm", data / "mono2.dcm"])
    assert rows["native.dcm"]["logit"] == expected[str(data / "native.dcm")]
    assert rows["mono2.dcm"]["logit"] == expected[str(data / "mono2.dcm")]
    assert rows["EXPORT0001"]["logit"] == rows["native.dcm"]["logit"]
    assert rows["knee.dcm"]["error"].startswith("skipped: BodyPartExamined KNEE")
    assert rows["sr.dcm"]["error"].startswith("skipped: Modality SR")
