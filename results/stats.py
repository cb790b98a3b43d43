"""``xr-results stats``: counts by status, the flagged rate, throughput, latency percentiles, the drift watch
per calibration (results/drift.py) and the alarms from the reviews (results/reviewed.py)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import func, select

from xr.results.drift import drift
from xr.results.export import format_value
from xr.results.reviewed import site_alarms
from xr.results.schema import FINAL_STATUSES, SCORED, STATUSES, CalibrationRecord, Result, Status


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def compute_stats(sessions, since: dt.datetime | None = None) -> dict[str, Any]:
    with sessions() as s:
        cond = [Result.processed_at >= since] if since else []
        counts = dict(s.execute(select(Result.status, func.count()).where(*cond).group_by(Result.status)).all())
        if since:  # claimed rows have no processed_at; count the ones received in the window
            counts.pop("claimed", None)
            n_claimed = s.scalar(select(func.count()).where(Result.status == "claimed", Result.received_at >= since))
            if n_claimed:
                counts["claimed"] = n_claimed
        final = [Result.status.in_(FINAL_STATUSES), *cond]
        n_flagged = (
            s.scalar(select(func.count()).where(Result.status.in_(SCORED), Result.flagged.is_(True), *cond)) or 0
        )
        lat = [x for (x,) in s.execute(select(Result.latency_ms).where(*final, Result.latency_ms.is_not(None)))]
        first_rx, last_done = s.execute(
            select(func.min(Result.received_at), func.max(Result.processed_at)).where(*final)
        ).one()
        drift = drift_by_calibration(s, cond)
        alarms = site_alarms(s, since)
    n_scored = sum(counts.get(k, 0) for k in SCORED)
    n_final = sum(counts.get(k, 0) for k in FINAL_STATUSES)
    span = (last_done - first_rx).total_seconds() if first_rx and last_done else 0.0
    return {
        "total": sum(counts.values()),
        "by_status": {k: counts.get(k, 0) for k in STATUSES},
        "flagged": n_flagged,
        "flagged_rate": (n_flagged / n_scored) if n_scored else None,
        "throughput_files_per_s": (n_final / span) if span > 0 else None,
        "first_received_at": format_value(first_rx) or None,
        "last_processed_at": format_value(last_done) or None,
        "latency_ms_p50": percentile(lat, 0.50),
        "latency_ms_p95": percentile(lat, 0.95),
        "drift": drift,
        "alarms": alarms,  # from the reviews and by scanner (results/drift.py)
    }


def drift_by_calibration(s, cond: list) -> dict[str, dict[str, Any]]:
    """Per calibration that scored films in the window: the drift watch (daemon/drift.py) on its ``ok`` rows."""
    refs = {c.id: c for c in s.scalars(select(CalibrationRecord))}
    probs: dict[str, list[float]] = {}
    for cid, p in s.execute(select(Result.calibration_id, Result.probability).where(Result.status == Status.OK, *cond)):
        if cid is not None and p is not None:
            probs.setdefault(cid, []).append(p)
    out = {}
    for cid, values in sorted(probs.items()):
        ref = refs.get(cid)
        reference = json.loads(ref.reference) if ref is not None and ref.reference else None
        out[cid] = drift(reference, values, ref.threshold if ref is not None else 0.5)
    return out
