"""The window's films and their reviews, as the flag's performance at this site needs them: the counts
results/performance.py estimates from (overall and by scanner), the turnaround of flagged and unflagged
films, and the reviewed cases with their weights, from which ``xr-train site-calibrate --from-db`` fits.

A film here is an ``ok`` row (a re-export, ``duplicate``, is the same film again and counts once). Its
review is the first one recorded. Reviews of films that were neither flagged nor drawn for audit are left
out: nobody chose those at random, so they say nothing about the films nobody read.

Weights: a reviewed flagged film stands for N_F / n_F flagged films (the share of them reviewed), an
audit review for N_U / n_U unflagged ones (about 1 / ``review.audit_rate`` when every audit case is read).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select

from xr.results.performance import ReviewCounts, estimate
from xr.results.schema import Result, Review, Status

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Film:
    id: int
    filename: str
    flagged: bool
    audit: bool
    logit: float | None
    model_id: str | None
    calibration_id: str | None
    patient_id: str | None
    scanner: str
    received_at: dt.datetime
    processed_at: dt.datetime | None
    decision: str | None  # pneumonia | normal | None (not reviewed)
    reviewed_at: dt.datetime | None

    @property
    def counted_review(self) -> bool:
        """A review the estimates use: of a flagged film, or of an audit case."""
        return self.decision is not None and (self.flagged or self.audit)


def scanner_of(manufacturer: str | None, station: str | None) -> str:
    """``Manufacturer / StationName`` from the DICOM header; ``unknown`` for a PNG/JPEG or an empty header."""
    parts = [p.strip() for p in (manufacturer, station) if p and p.strip()]
    return " / ".join(parts) if parts else UNKNOWN


def films(s, since: dt.datetime | None = None, until: dt.datetime | None = None) -> list[Film]:
    """The ``ok`` films scored in [since, until), each with its first review."""
    cond = [Result.status == Status.OK]
    if since is not None:
        cond.append(Result.processed_at >= since)
    if until is not None:
        cond.append(Result.processed_at < until)
    stmt = select(
        Result.id,
        Result.filename,
        Result.flagged,
        Result.audit,
        Result.logit,
        Result.model_id,
        Result.calibration_id,
        Result.patient_id,
        Result.manufacturer,
        Result.station_name,
        Result.received_at,
        Result.processed_at,
    ).where(*cond)
    rows = s.execute(stmt.order_by(Result.id)).all()
    first: dict[int, tuple[str, dt.datetime]] = {}
    reviewed = select(Review.result_id, Review.decision, Review.reviewed_at).join(Result, Review.result_id == Result.id)
    for rid, decision, at in s.execute(reviewed.where(*cond).order_by(Review.id)):
        first.setdefault(rid, (decision, at))
    return [
        Film(
            r.id,
            r.filename,
            bool(r.flagged),
            bool(r.audit),
            r.logit,
            r.model_id,
            r.calibration_id,
            r.patient_id,
            scanner_of(r.manufacturer, r.station_name),
            r.received_at,
            r.processed_at,
            *first.get(r.id, (None, None)),
        )
        for r in rows
    ]


def review_counts(window: list[Film]) -> ReviewCounts:
    flagged = [f for f in window if f.flagged]
    unflagged = [f for f in window if not f.flagged]
    read_f = [f for f in flagged if f.decision is not None]
    read_u = [f for f in unflagged if f.audit and f.decision is not None]
    return ReviewCounts(
        flagged=len(flagged),
        unflagged=len(unflagged),
        flagged_reviewed=len(read_f),
        flagged_pneumonia=sum(f.decision == "pneumonia" for f in read_f),
        audit_reviewed=len(read_u),
        audit_pneumonia=sum(f.decision == "pneumonia" for f in read_u),
    )


def _summary(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0, "mean_s": None, "p90_s": None, "max_s": None}
    v = np.asarray(seconds, dtype=np.float64)
    return {"n": int(v.size), "mean_s": float(v.mean()), "p90_s": float(np.percentile(v, 90)), "max_s": float(v.max())}


def turnaround(window: list[Film]) -> dict:
    """Seconds from arrival to score, and from score to review, for flagged films and unflagged ones (the
    audit cases are the unflagged films anyone reads): a queue that starves one group shows here."""
    out = {}
    for group, members in (
        ("flagged", [f for f in window if f.flagged]),
        ("unflagged", [f for f in window if not f.flagged]),
    ):
        scored = [(f.processed_at - f.received_at).total_seconds() for f in members if f.processed_at]
        read = [
            (f.reviewed_at - f.processed_at).total_seconds()
            for f in members
            if f.counted_review and f.processed_at and f.reviewed_at
        ]
        out[group] = {"arrival_to_score": _summary(scored), "score_to_review": _summary(read)}
    return out


def performance(window: list[Film], *, by_scanner: bool = False, level: float = 0.95) -> dict:
    """The flag's sensitivity, specificity, PPV and NPV (each ``estimate``, ``low``, ``high``), what they
    rest on (``reviews``) and the turnaround; with ``by_scanner`` the same estimates per scanner."""
    out = estimate(review_counts(window), level=level)
    out["turnaround"] = turnaround(window)
    if by_scanner:
        groups: dict[str, list[Film]] = {}
        for f in window:
            groups.setdefault(f.scanner, []).append(f)
        out["by_scanner"] = {name: estimate(review_counts(g), level=level) for name, g in sorted(groups.items())}
    return out


@dataclass(frozen=True)
class WeightedCases:
    """Reviewed films as a labelled sample of the window: the reader's decision is the label."""

    ids: np.ndarray
    logits: np.ndarray
    labels: np.ndarray  # 1 = pneumonia
    weights: np.ndarray  # films of the window each stands for
    groups: np.ndarray  # patient ID where the header had one, else the film: no patient on both sides of a split
    counts: ReviewCounts


def weighted_cases(window: list[Film], model_id: str | None = None, group=None) -> WeightedCases:
    """The counted reviews of films scored by ``model_id`` (their stored logits are that model's), weighted
    by the inverse of the share of their group that was reviewed. ``group(film)``: its patient (default:
    the DICOM PatientID, else the film itself)."""
    window = [f for f in window if f.logit is not None and (model_id is None or f.model_id == model_id)]
    counts = review_counts(window)
    w_f = counts.flagged / counts.flagged_reviewed if counts.flagged_reviewed else 0.0
    w_u = counts.unflagged / counts.audit_reviewed if counts.audit_reviewed else 0.0
    read = [f for f in window if f.counted_review and (f.flagged or f.audit)]
    return WeightedCases(
        ids=np.array([f.id for f in read], dtype=np.int64),
        logits=np.array([f.logit for f in read], dtype=np.float64),
        labels=np.array([int(f.decision == "pneumonia") for f in read], dtype=np.int64),
        weights=np.array([w_f if f.flagged else w_u for f in read], dtype=np.float64),
        groups=np.array([(group or _patient)(f) for f in read]),
        counts=counts,
    )


def _patient(f: Film) -> str:
    return f.patient_id or f"film-{f.id}"


def site_alarms(s, since: dt.datetime | None = None) -> list[dict]:
    """The review-based alarms of results/drift.py over the window: per calibration with a measured
    performance, its PPV and sensitivity from the reviews of the films it scored; per scanner, its flag
    rate against the site's."""
    import json

    from xr.results.drift import performance_alarms, scanner_alarms
    from xr.results.schema import CalibrationRecord

    window = films(s, since)
    out: list[dict] = []
    refs = {c.id: c.reference for c in s.scalars(select(CalibrationRecord))}
    by_cal: dict[str, list[Film]] = {}
    for f in window:
        by_cal.setdefault(f.calibration_id or "", []).append(f)
    for cid, group in sorted(by_cal.items()):
        reference = json.loads(refs[cid]) if refs.get(cid) else None
        expected = (reference or {}).get("performance")
        if expected:
            out += performance_alarms(expected, estimate(review_counts(group)), f"calibration {cid}")
    rates: dict[str, tuple[int, int]] = {}
    for f in window:
        flagged, n = rates.get(f.scanner, (0, 0))
        rates[f.scanner] = (flagged + f.flagged, n + 1)
    return out + scanner_alarms(rates)
