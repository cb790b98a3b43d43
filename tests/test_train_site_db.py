"""train/site_db.py, `xr-train site-calibrate --from-db`: the site calibration fitted from the reviews in the
results database equals the labelled-folder form where every film is reviewed (weights 1), weights count
like repeated films, and too few reviews are said or refused."""

from __future__ import annotations

import datetime as dt
import json
import os

import numpy as np
import pytest

from xr.core.errors import XRError
from xr.core.predict import Predictor
from xr.results.engine import make_engine, session_factory
from xr.results.schema import Result, Review, Status
from xr.train import calibrate as cal
from xr.train.analysis import score_items
from xr.train.site import _site_items, site_calibrate
from xr.train.site_db import site_calibrate_from_db

T0 = dt.datetime(2026, 12, 1, 8)
FAST = {"n_boot": 60, "cv_repeats": 3}


def _reviewed_db(db, items, logits, predictor, *, read=lambda i, flagged: True, label=None) -> None:
    """The films as a daemon with audit_rate 1 would leave them once the readers had read them: every
    unflagged film an audit case; the reviews say the folder's labels."""
    base = predictor.calibration
    sessions = session_factory(eng := make_engine(db))
    with sessions.begin() as s:
        for i, (it, z) in enumerate(zip(items, logits)):
            flagged = bool(base.probability(z) >= base.threshold)
            row = Result(
                path=it.path,
                filename=os.path.basename(it.path),
                size_bytes=1,
                mtime_ns=i,
                status=Status.OK,
                logit=float(z),
                probability=float(base.probability(z)),
                flagged=flagged,
                audit=not flagged,
                model_id=predictor.model_id,
                received_at=T0,
                claimed_at=T0,
                processed_at=T0,
            )
            s.add(row)
            s.flush()
            if read(i, flagged):
                y = it.label if label is None else label(i)
                decision = "pneumonia" if y == 1 else "normal"
                s.add(Review(result_id=row.id, decision=decision, reviewer="r", reviewed_at=T0))
    eng.dispose()


@pytest.fixture(scope="module")
def scored(tiny_checkpoint, fixtures_dir):
    data = fixtures_dir / "chest_xray" / "train"
    items = _site_items(data)
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    return data, items, score_items(predictor, items, 8, 0), predictor


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, float) or isinstance(b, float):
        assert (a is None and b is None) or a == pytest.approx(b, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


def test_every_film_reviewed_gives_the_folder_form(scored, tiny_checkpoint, tmp_path):
    data, items, logits, predictor = scored
    folder = site_calibrate(tiny_checkpoint, data, tmp_path / "folder", device="cpu", **FAST)
    _reviewed_db(tmp_path / "r.sqlite", items, logits, predictor)
    from_db = site_calibrate_from_db(tiny_checkpoint, tmp_path / "r.sqlite", tmp_path / "db", device="cpu", **FAST)
    assert from_db["from_db"]["weight_flagged"] in (None, 1.0) and from_db["from_db"]["weight_audit"] in (None, 1.0)
    for key in ("scale", "shift", "threshold", "before", "after", "cross_validated", "model_id", "n"):
        _close(folder[key], from_db[key], key)
    a = json.loads((tmp_path / "folder" / "calibration_threshold.json").read_text())
    b = json.loads((tmp_path / "db" / "calibration_threshold.json").read_text())
    assert a["model_sha256"] == b["model_sha256"] and a["threshold"] == pytest.approx(b["threshold"])
    for m in ("sensitivity", "ppv"):  # what the drift watch later holds the reviews to
        got = b["reference"]["performance"][m]
        assert got["low"] <= got["value"] <= got["high"]
        assert got["value"] == pytest.approx(a["reference"]["performance"][m]["value"])
    assert from_db["warning"] and "too few" in from_db["warning"]  # the fixtures: a handful of films
    assert "Warning" in (tmp_path / "db" / "SITE_REPORT.md").read_text()


def test_a_weight_counts_like_that_many_copies_of_the_film():
    rng = np.random.default_rng(3)
    z = rng.normal(size=60) + np.repeat([1.0, -1.0], 30)
    y = np.repeat([1, 0], 30)
    w = rng.integers(1, 4, size=60).astype(float)
    rep_z, rep_y = np.repeat(z, w.astype(int)), np.repeat(y, w.astype(int))
    assert cal.fit_logistic(z, y, weights=w) == pytest.approx(cal.fit_logistic(rep_z, rep_y), rel=1e-5)
    p = cal.sigmoid(z)
    assert cal.ece(p, y, weights=w) == pytest.approx(cal.ece(np.repeat(p, w.astype(int)), rep_y))
    assert cal.choose_threshold(p, y, weights=w) == pytest.approx(
        cal.choose_threshold(np.repeat(p, w.astype(int)), rep_y)
    )


def test_too_few_reviews_are_refused_and_unaudited_streams_too(scored, tiny_checkpoint, tmp_path):
    data, items, logits, predictor = scored
    _reviewed_db(tmp_path / "none.sqlite", items, logits, predictor, read=lambda i, flagged: flagged)
    with pytest.raises(XRError, match="no audit case reviewed|at least"):
        site_calibrate_from_db(tiny_checkpoint, tmp_path / "none.sqlite", tmp_path / "o1", device="cpu", **FAST)
    _reviewed_db(tmp_path / "one.sqlite", items, logits, predictor, label=lambda i: int(i == 0))
    with pytest.raises(XRError, match="at least 4 of each"):
        site_calibrate_from_db(tiny_checkpoint, tmp_path / "one.sqlite", tmp_path / "o2", device="cpu", **FAST)


def test_cli_from_db(scored, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from xr.train import cli, site

    data, items, logits, predictor = scored
    monkeypatch.setattr(cli, "tune_malloc", lambda: False)
    real = site.fit_and_report
    monkeypatch.setattr("xr.train.site_db.fit_and_report", lambda *a, **kw: real(*a, **kw, **FAST))
    (tmp_path / "output").mkdir()
    _reviewed_db(tmp_path / "output" / "results.sqlite", items, logits, predictor)
    argv = ["site-calibrate", "--from-db", "--output", str(tmp_path / "output"), "--model", str(tiny_checkpoint)]
    assert cli.main([*argv, "--since", "2026-11-30", "--out", str(tmp_path / "cal"), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "site-calibrate" in captured.out and "too few to trust" in captured.err
    assert (tmp_path / "cal" / "calibration_threshold.json").exists()
