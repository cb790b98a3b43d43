"""Audit sampling at the batch commit, and the flag's performance estimated through the database
(results/reviewed.py, xr-results performance) against simulated sites whose truth is known."""

from __future__ import annotations

import datetime as dt
import io
import json
import math

import numpy as np
from sqlalchemy import select

from xr.results import journal
from xr.results.engine import make_engine, session_factory
from xr.results.reviewed import films, performance, review_counts, weighted_cases
from xr.results.schema import Result, Review, Status

NOW = dt.datetime(2026, 12, 1, 8)


class _Model:
    model_id, threshold, temperature, calibration_id = "m-1", 0.5, 1.0, "cal-1"


class _Score:
    def __init__(self, flagged: bool):
        self.logit, self.probability, self.flagged = (2.0, 0.88, True) if flagged else (-2.0, 0.12, False)
        self.label = "PNEUMONIA" if flagged else "NORMAL"


def test_audit_sampling_draws_the_configured_share_of_unflagged_ok_films(tmp_path):
    """Each unflagged ``ok`` film is an audit case with probability audit_rate (binomial bound), a flagged
    or failed one never; audit_rate 0 draws none."""
    sessions = session_factory(eng := make_engine(tmp_path / "r.sqlite"))
    lease = journal.Lease("w1", 30, exclusive=True)
    n, rate = 3000, 0.1
    files = [journal.FileClaim(f"/in/{i:05d}.png", 10, i, NOW, {"sha256": f"s{i}"}) for i in range(n)]
    with sessions.begin() as s:
        claims = journal.claim_files(s, files, lease, NOW)
    outcomes = []
    for i, c in enumerate(claims):
        if i % 10 == 0:
            outcomes.append(journal.Outcome(c.row_id, c.token, Status.ERROR, NOW, error="bad"))
        else:
            outcomes.append(journal.Outcome(c.row_id, c.token, Status.OK, NOW, score=_Score(i % 4 == 0)))
    with sessions.begin() as s:
        committed = journal.commit_batch(
            s,
            outcomes,
            worker="w1",
            model=_Model(),
            wait_ms=0,
            model_ms=0,
            place=lambda o: None,
            now=NOW,
            audit_rate=rate,
        )
    assert len(committed.rows) == n
    with sessions() as s:
        rows = s.execute(select(Result.status, Result.flagged, Result.audit)).all()
    unflagged = [r for r in rows if r.status == Status.OK and not r.flagged]
    drawn = sum(r.audit for r in unflagged)
    sd = math.sqrt(len(unflagged) * rate * (1 - rate))
    assert abs(drawn - len(unflagged) * rate) < 4.5 * sd, (drawn, len(unflagged))
    assert not any(r.audit for r in rows if r.status != Status.OK or r.flagged)
    # the same outcomes with audit_rate 0: nothing drawn
    with sessions.begin() as s:
        claims = journal.claim_files(s, [journal.FileClaim("/in/z.png", 1, 1, NOW, {"sha256": "z"})], lease, NOW)
        journal.commit_batch(
            s,
            [journal.Outcome(claims[0].row_id, 0, Status.OK, NOW, score=_Score(False))],
            worker="w1",
            model=_Model(),
            wait_ms=0,
            model_ms=0,
            place=lambda o: None,
            now=NOW,
            audit_rate=0.0,
            draw=lambda: 0.0,
        )
        assert s.get(Result, claims[0].row_id).audit is False
    eng.dispose()


def simulate_site(
    sessions, rng, n=300, prevalence=0.45, sens=0.9, spec=0.8, audit_rate=0.3, share_read=1.0, scanners=None
):
    """A window of ``n`` films with known labels, flagged with the given sensitivity and specificity, audit
    cases drawn at ``audit_rate``, a ``share_read`` of flagged films and every audit case read correctly.
    Returns the true sensitivity and specificity of the flag on these films."""
    truth = rng.random(n) < prevalence
    flagged = np.where(truth, rng.random(n) < sens, rng.random(n) >= spec)
    audit = ~flagged & (rng.random(n) < audit_rate)
    read = np.where(flagged, rng.random(n) < share_read, audit)
    with sessions.begin() as s:
        for i in range(n):
            scanner = ("ACME", "ROOM-1") if i % 3 else (None, None)
            if scanners is not None:
                scanner = scanners(i, flagged[i])
            row = Result(
                path=f"/in/{i}.png",
                filename=f"{i}.png",
                size_bytes=1,
                mtime_ns=i,
                status=Status.OK,
                logit=float(rng.normal(1.5 if truth[i] else -1.5)),
                probability=0.5,
                flagged=bool(flagged[i]),
                audit=bool(audit[i]),
                model_id="m-1",
                received_at=NOW + dt.timedelta(seconds=i),
                claimed_at=NOW,
                processed_at=NOW + dt.timedelta(seconds=i + 2),
                manufacturer=scanner[0],
                station_name=scanner[1],
                patient_id=f"P{i // 2}",
                calibration_id="site-1",
            )
            s.add(row)
            s.flush()
            if read[i]:
                decision = "pneumonia" if truth[i] else "normal"
                at = NOW + dt.timedelta(seconds=i + 60 * (1 if flagged[i] else 10))
                s.add(Review(result_id=row.id, decision=decision, reviewer="r", reviewed_at=at))
    tp = (truth & flagged).sum()
    return tp / truth.sum(), ((~truth) & (~flagged)).sum() / (~truth).sum()


def test_performance_through_the_database_covers_the_truth_of_simulated_sites(tmp_path):
    """Sites simulated with known truth, written as rows and reviews, read back by results/reviewed.py: the
    95% intervals of sensitivity and specificity hold the flag's true figures on those films at about
    their nominal rate."""
    rng = np.random.default_rng(34)
    hits = {"sensitivity": 0, "specificity": 0}
    runs = 20
    for k in range(runs):
        sessions = session_factory(eng := make_engine(tmp_path / f"site{k}.sqlite"))
        true = dict(zip(hits, simulate_site(sessions, rng, share_read=0.7)))
        with sessions() as s:
            r = performance(films(s))
        eng.dispose()
        for m in hits:
            hits[m] += r[m]["low"] <= true[m] <= r[m]["high"]
    assert all(h >= runs - 4 for h in hits.values()), hits


def test_performance_cli_json_table_and_by_scanner(any_db, tmp_path):
    from xr.results.cli import main

    sessions = session_factory(eng := make_engine(any_db))
    true_sens, true_spec = simulate_site(sessions, np.random.default_rng(1), n=200)
    with sessions() as s:
        window = films(s)
    counts = review_counts(window)
    assert counts.flagged + counts.unflagged == 200 and counts.flagged_reviewed == counts.flagged
    cases = weighted_cases(window, "m-1")
    assert len(cases.ids) == counts.flagged_reviewed + counts.audit_reviewed
    assert np.isclose(cases.weights.sum(), 200)  # the reviewed films stand for the whole window
    eng.dispose()
    out = io.StringIO()
    assert main(["--db", str(any_db), "performance", "--format", "json", "--by", "scanner"], out=out) == 0
    got = json.loads(out.getvalue())
    for m in ("sensitivity", "specificity", "ppv", "npv"):
        assert set(got[m]) == {"estimate", "low", "high"}
    assert got["sensitivity"]["low"] <= true_sens <= got["sensitivity"]["high"]
    assert got["specificity"]["low"] <= true_spec <= got["specificity"]["high"]
    assert got["reviews"]["total"] == counts.flagged_reviewed + counts.audit_reviewed
    assert set(got["by_scanner"]) == {"ACME / ROOM-1", "unknown"}
    t = got["turnaround"]
    assert t["flagged"]["arrival_to_score"]["max_s"] == 2.0
    assert t["unflagged"]["score_to_review"]["mean_s"] > t["flagged"]["score_to_review"]["mean_s"]
    out = io.StringIO()
    assert main(["--db", str(any_db), "performance", "--since", "2026-12-01"], out=out) == 0
    text = out.getvalue()
    assert "sensitivity" in text and "audit cases" in text and "arrival to score" in text


def test_alarms_when_sensitivity_or_ppv_leave_the_calibration_interval_and_by_scanner(tmp_path, capsys):
    """A calibration that measured sensitivity 0.97-0.995 and PPV 0.85-0.95 on its films, a stream whose
    flag finds 70% of pneumonia: a sensitivity alarm (xr-results stats line, warning, the daemon's
    site_alarm event and gauge); a scanner flagging twice the site's rate: a scanner alarm."""
    from xr.daemon.metrics import Metrics, SiteWatch
    from xr.results.cli import main
    from xr.results.reviewed import site_alarms
    from xr.results.schema import CalibrationRecord

    db = tmp_path / "r.sqlite"
    sessions = session_factory(eng := make_engine(db))
    performance_ref = {"sensitivity": {"value": 0.98, "low": 0.97, "high": 0.995}, "ppv": {"low": 0.5, "high": 0.99}}
    with sessions.begin() as s:
        s.add(
            CalibrationRecord(
                id="site-1",
                model_id="m-1",
                kind="site",
                temperature=1.0,
                shift=0.0,
                threshold=0.5,
                reference=json.dumps({"flagged_rate": 0.4, "fractions": [0.1] * 10, "performance": performance_ref}),
                first_used_at=NOW,
            )
        )
    # scanner B: every flagged film; scanner A: the unflagged ones and a few flagged
    simulate_site(
        sessions,
        np.random.default_rng(5),
        n=400,
        sens=0.7,
        spec=0.9,
        audit_rate=0.5,
        scanners=lambda i, flagged: ("B", "ROOM-2") if flagged and i % 4 else ("A", "ROOM-1"),
    )
    with sessions() as s:
        alarms = site_alarms(s)
    kinds = {a["alarm"]: a for a in alarms}
    assert set(kinds) == {"sensitivity", "scanner_flag_rate"}, alarms
    assert "measured at calibration" in kinds["sensitivity"]["reason"]
    assert {a["subject"] for a in alarms if a["alarm"] == "scanner_flag_rate"} == {"A / ROOM-1", "B / ROOM-2"}
    out = io.StringIO()
    assert main(["--db", str(db), "stats"], out=out) == 0
    assert "alarm sensitivity" in out.getvalue() and "alarm scanner_flag_rate" in out.getvalue()
    assert "outside 0.970-0.995" in capsys.readouterr().err

    events = []

    class Log:
        def warning(self, event, **kw):
            events.append((event, kw))

    metrics = Metrics(lambda: 0.0)
    watch = SiteWatch(sessions, Log(), metrics, interval_s=3600, window_days=3650)
    assert watch.tick() is None  # not due yet
    assert len(watch.check()) == 3
    assert [e for e, _ in events] == ["site_alarm"] * 3
    text = metrics.exposition().decode()
    assert 'xr_site_alarm{alarm="sensitivity",subject="calibration site-1"} 1.0' in text
    eng.dispose()
