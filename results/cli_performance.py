"""``xr-results performance``: how the flag does at this site, from the readers' reviews
(results/reviewed.py, results/performance.py), and how long films wait to be scored and read."""

from __future__ import annotations

import sys

from xr.core.errors import XRError
from xr.results.cli_common import flat, write_json, write_metrics
from xr.results.engine import session_factory
from xr.results.performance import METRICS
from xr.results.reviewed import films, performance

NAMES = {"sensitivity": "sensitivity", "specificity": "specificity", "ppv": "PPV", "npv": "NPV"}


def run(args, open_db, out) -> int:
    try:
        engine = open_db(args)
    except XRError as exc:
        print(f"xr-results: {exc}", file=sys.stderr)
        return 2
    try:
        with session_factory(engine)() as s:
            window = films(s, args.since)
    finally:
        engine.dispose()
    result = performance(window, by_scanner=args.by == "scanner")
    result["since"] = args.since.isoformat(timespec="seconds") + "Z" if args.since else None
    if args.format == "json":
        write_json(result, out)
    elif args.format == "csv":
        write_metrics(flat(result), out)
    else:
        print_table(result, out)
    return 0


def rests_on(r: dict) -> str:
    n = r["reviews"]
    return (
        f"{n['flagged'] + n['unflagged']} films ({n['flagged']} flagged, {n['unflagged']} not); "
        f"{n['total']} reviews: {n['flagged_reviewed']} of flagged films, {n['audit_reviewed']} audit cases"
    )


def _metric_lines(r: dict, indent: str = "") -> list[str]:
    lines = []
    for m in METRICS:
        v = r[m]
        shown = "-  (no reviews to say)" if v is None else f"{v['estimate']:.3f}  ({v['low']:.3f}-{v['high']:.3f})"
        lines.append(f"{indent}{NAMES[m]:<12} {shown}")
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def print_table(r: dict, out) -> None:
    level = round(r["reviews"]["level"] * 100)
    print(f"performance of the flag{' since ' + r['since'] if r['since'] else ''}: {rests_on(r)}", file=out)
    print(f"{'metric':<12} estimate ({level}% interval)", file=out)
    for line in _metric_lines(r):
        print(line, file=out)
    if r["reviews"]["audit_reviewed"] == 0:
        print("no audit case reviewed: nothing says how many pneumonia films went unflagged", file=out)
    print(file=out)
    print(f"{'turnaround':<30} {'n':>6} {'mean':>8} {'p90':>8} {'max':>8}", file=out)
    for group, t in r["turnaround"].items():
        for step, v in t.items():
            name = f"{group} {step.replace('_', ' ')}"
            cells = [_duration(v[k]) for k in ("mean_s", "p90_s", "max_s")]
            print(f"{name:<30} {v['n']:>6} {cells[0]:>8} {cells[1]:>8} {cells[2]:>8}", file=out)
    for name, g in (r.get("by_scanner") or {}).items():
        print(file=out)
        print(f"scanner {name}: {rests_on(g)}", file=out)
        for line in _metric_lines(g, "  "):
            print(line, file=out)
