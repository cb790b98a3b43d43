"""``GET /performance``: the flag's performance at this site for auditors and admins, from the readers'
reviews (results/reviewed.py): sensitivity, specificity, PPV and NPV with their 95% intervals, what they
rest on, turnaround times, the same by scanner, and charts over time drawn here as SVG (the CSP allows
no script, and none is needed)."""

import datetime as dt
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from markupsafe import Markup, escape

from xr.results import audit
from xr.results.performance import METRICS, estimate
from xr.results.reviewed import films, performance, review_counts
from xr.results.schema import utcnow
from xr.review.deps import SignedIn, allow

NAMES = {"sensitivity": "Sensitivity", "specificity": "Specificity", "ppv": "PPV", "npv": "NPV"}
W, H, PAD = 520, 150, 34


def over_time(window: list, since: dt.datetime, days: float) -> list[dict]:
    """The window cut into buckets (a day up to two weeks, else a week): per bucket its films, flag rate and
    the four estimates."""
    step = dt.timedelta(days=1 if days <= 14 else 7)
    n = max(1, int(dt.timedelta(days=days) / step + 0.999))
    buckets: list[list] = [[] for _ in range(n)]
    for f in window:
        if f.processed_at is not None:
            buckets[min(n - 1, int((f.processed_at - since) / step))].append(f)
    out = []
    for i, members in enumerate(buckets):
        est = estimate(review_counts(members), draws=4000) if members else {m: None for m in METRICS}
        rate = sum(f.flagged for f in members) / len(members) if members else None
        out.append(
            {"start": since + i * step, "films": len(members), "flag_rate": rate, **{m: est[m] for m in METRICS}}
        )
    return out


def svg_chart(series: list[dict], metric: str) -> Markup:
    """One metric over time: its estimate as a line and its 95% interval as a band; gaps where the bucket's
    reviews cannot say."""
    n = len(series)

    def x(i: int) -> float:
        return PAD + (W - PAD - 8) * (i + 0.5) / n

    def y(v: float) -> float:
        return 8 + (H - PAD) * (1 - v)

    parts = [f'<svg class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">']
    for v in (0.0, 0.5, 1.0):
        parts.append(f'<line x1="{PAD}" x2="{W - 8}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#dde3ea"/>')
        parts.append(f'<text x="{PAD - 4}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="10">{v:.1f}</text>')
    points = [(i, b[metric]) for i, b in enumerate(series) if b[metric] is not None]
    for i, e in points:
        parts.append(
            f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{y(e["low"]):.1f}" y2="{y(e["high"]):.1f}" '
            'stroke="#9db4cc" stroke-width="6" stroke-linecap="round"/>'
        )
    if len(points) > 1:
        path = " ".join(f"{x(i):.1f},{y(e['estimate']):.1f}" for i, e in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#1f4e79" stroke-width="1.5"/>')
    for i, e in points:
        parts.append(f'<circle cx="{x(i):.1f}" cy="{y(e["estimate"]):.1f}" r="2.5" fill="#1f4e79"/>')
    for i in sorted({0, n - 1}):
        label = escape(series[i]["start"].strftime("%Y-%m-%d"))
        parts.append(f'<text x="{x(i):.1f}" y="{H - 6}" text-anchor="middle" font-size="10">{label}</text>')
    if not points:
        parts.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" font-size="12">no reviews to say</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def mount(app: FastAPI, *, sessions, page, remote) -> None:
    @app.get("/performance")
    def performance_page(
        request: Request, who: SignedIn, days: Annotated[float, Query(gt=0, le=3660)] = 90
    ) -> Response:
        allow(who, "auditor", "admin")
        since = utcnow() - dt.timedelta(days=days)
        with sessions.begin() as s:
            window = films(s, since)
            audit.record(s, "view_performance", user=who.name, remote_addr=remote(request), detail=f"{days:g} days")
        result = performance(window, by_scanner=True)
        series = over_time(window, since, days)
        context = {
            "days": days,
            "r": result,
            "metrics": METRICS,
            "names": NAMES,
            "charts": {m: svg_chart(series, m) for m in METRICS},
            "series": series,
        }
        return page(request, "performance.html", who, context)
