"""``xr-results``: list, export and summarise the daemon's results database.

Here: the parser, ``list``, ``reviews`` and ``stats``; the other sub-commands in results/cli_admin.py
(``audit``, ``import``, ``backup``), results/cli_outbox.py, results/cli_performance.py and results/cli_ops.py
(``prune``, ``retry``); what they share in results/cli_common.py."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from xr.core.errors import XRError
from xr.results import cli_admin, cli_outbox
from xr.results.cli_common import (
    db_location,
    flat,
    open_db,
    parse_since,
    positive_int,
    settings,
    write_json,
    write_metrics,
    write_rows,
)
from xr.results.engine import session_factory
from xr.results.export import csv_columns
from xr.results.schema import (
    OUTBOX_STATUSES,
    SCORED,
    STATUSES,
    Result,
    Review,
)
from xr.results.stats import compute_stats, percentile  # noqa: F401 - percentile: xr-results' own, re-exported

TABLE_COLUMNS = ("id", "processed_at", "filename", "status", "probability", "label", "flagged", "error")


def build_parser() -> argparse.ArgumentParser:
    def common(parser: argparse.ArgumentParser, top: bool) -> None:
        # options may come before or after the sub-command; a sub-command's unset option keeps the top value
        d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
        parser.add_argument(
            "--db",
            default=d(None),
            help="database path or SQLAlchemy URL (default: daemon.db, else <output>/results.sqlite)",
        )
        parser.add_argument("--output", default=d(None), help="the daemon's output folder (default: daemon.output)")
        parser.add_argument(
            "--config", default=d(None), help="config.yaml (default: $XR_CONFIG, else the packaged defaults)"
        )
        parser.add_argument(
            "--since",
            type=parse_since,
            default=d(None),
            help="only rows processed since (ISO UTC time, or 30m / 12h / 7d)",
        )
        parser.add_argument("--format", choices=("table", "csv", "json"), default=d("table"))

    def list_opts(parser: argparse.ArgumentParser, top: bool) -> None:
        d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
        parser.add_argument("--flagged", action="store_true", default=d(False), help="only flagged cases")
        parser.add_argument("--status", choices=STATUSES, default=d(None), help="only rows with this status")
        parser.add_argument("--accession", default=d(None), help="only rows of this DICOM accession number")
        parser.add_argument("--patient", default=d(None), help="only rows of this DICOM patient ID")
        parser.add_argument("--limit", type=positive_int, default=d(None), help="at most N rows (the newest)")
        parser.add_argument("--all-columns", action="store_true", default=d(False), help="table format: every column")

    p = argparse.ArgumentParser(prog="xr-results", description="Query the xr-daemon results database.")
    common(p, True)
    list_opts(p, True)
    sub = p.add_subparsers(dest="command")
    lst = sub.add_parser("list", help="list result rows (default command)")
    common(lst, False)
    list_opts(lst, False)
    stats = sub.add_parser("stats", help="counts by status, flagged rate, throughput, latency percentiles")
    common(stats, False)
    reviews = sub.add_parser("reviews", help="the readers' decisions from xr-review, with their films")
    common(reviews, False)
    perf = sub.add_parser(
        "performance",
        help="the flag's sensitivity, specificity, PPV and NPV at this site from the reviews, and turnaround times",
    )
    common(perf, False)
    perf.add_argument("--by", choices=("scanner",), help="also per scanner (DICOM Manufacturer / StationName)")
    aud = sub.add_parser("audit", help="xr-review's audit trail: sign-ins, who looked at which case, decisions")
    common(aud, False)
    aud.add_argument("--user", help="only this user's events")
    aud.add_argument("--action", help="only this action (login, login_failed, view_case, view_image, review, ...)")
    imp = sub.add_parser("import", help="load an xr-score output folder into the database")
    common(imp, False)
    imp.add_argument("run", type=Path, help="the xr-score --out folder")
    ob = sub.add_parser(
        "outbox", help="DICOM results for the PACS: counts by destination and status, then the items (newest first)"
    )
    common(ob, False)
    ob.add_argument("--status", dest="outbox_status", choices=OUTBOX_STATUSES, help="only items with this status")
    ob.add_argument("--limit", dest="outbox_limit", type=positive_int, default=50, help="at most N items (default 50)")
    ob.add_argument(
        "--retry-failed", action="store_true", help="put the failed items back in the queue (the daemon sends them)"
    )
    bk = sub.add_parser(
        "backup", help="copy the SQLite database to DEST, safe while the daemon runs (PostgreSQL: prints pg_dump)"
    )
    common(bk, False)
    bk.add_argument("dest", type=Path, help="the backup file to write (private, 0600)")
    bk.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    from xr.results import cli_ops

    cli_ops.add_parsers(sub, common)
    return p


REVIEW_LIST_COLUMNS = (
    "id",
    "reviewed_at",
    "result_id",
    "filename",
    "accession_number",
    "probability",
    "flagged",
    "audit",
    "decision",
    "reviewer",
    "note",
)


def query_reviews(sessions, since: dt.datetime | None) -> list[dict[str, Any]]:
    stmt = select(
        Review.id,
        Review.reviewed_at,
        Review.result_id,
        Result.filename,
        Result.accession_number,
        Result.probability,
        Result.flagged,
        Result.audit,  # a review of an audit case: the sample that says what the flag misses
        Review.decision,
        Review.reviewer,
        Review.note,
    ).join(Result, Review.result_id == Result.id)
    if since:
        stmt = stmt.where(Review.reviewed_at >= since)
    with sessions() as s:
        return [dict(m) for m in s.execute(stmt.order_by(Review.id)).mappings()]


def query_rows(sessions, args: argparse.Namespace) -> list[dict[str, Any]]:
    stmt = select(Result)
    if args.flagged:
        stmt = stmt.where(Result.flagged.is_(True), Result.status.in_(SCORED))
    if args.status:
        stmt = stmt.where(Result.status == args.status)
    if args.accession:
        stmt = stmt.where(Result.accession_number == args.accession)
    if args.patient:
        stmt = stmt.where(Result.patient_id == args.patient)
    if args.since:  # a claimed row has no processed_at yet: it counts from when it was received
        stmt = stmt.where(func.coalesce(Result.processed_at, Result.received_at) >= args.since)
    stmt = stmt.order_by(Result.id.desc())
    if args.limit:
        stmt = stmt.limit(args.limit)
    with sessions() as s:
        rows = [r.as_dict() for r in s.scalars(stmt)]
    return rows[::-1]


def main(argv: list[str] | None = None, out=None) -> int:
    try:
        return _main(argv, out or sys.stdout)
    except BrokenPipeError:  # `xr-results | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None, out) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("stats", "reviews", "audit", "performance"):
        ignored = [
            flag
            for flag, value in (
                ("--flagged", args.flagged),
                ("--status", args.status),
                ("--limit", args.limit),
                ("--all-columns", args.all_columns),
                ("--accession", args.accession),
                ("--patient", args.patient),
            )
            if value
        ]
        if ignored:
            parser.error(f"{args.command} takes only --since and --format; {', '.join(ignored)} only apply to list")
    if args.command == "import":
        return cli_admin.run_import(args, out)
    if args.command == "performance":
        from xr.results.cli_performance import run

        return run(args, open_db, out)
    if args.command == "audit":
        return cli_admin.run_audit(args, out)
    if args.command == "backup":
        return cli_admin.run_backup(args, out)
    if args.command in ("prune", "retry"):
        from xr.results import cli_ops

        return getattr(cli_ops, args.command)(args, db_location, out)
    if args.command == "outbox":
        return cli_outbox.run(args, out)
    try:
        engine = open_db(args)
    except XRError as exc:
        print(f"xr-results: {exc}", file=sys.stderr)
        return 2
    try:
        sessions = session_factory(engine)
        if args.command == "stats":
            st = compute_stats(sessions, args.since)
            for a in st["alarms"]:
                print(f"xr-results: warning: {a['reason']}", file=sys.stderr)
            for cid, d in st["drift"].items():
                if d["warning"]:
                    print(
                        f"xr-results: warning: drift for calibration {cid}: {d['reason']}; "
                        "consider `xr-train site-calibrate` on this site's films",
                        file=sys.stderr,
                    )
            if args.format == "json":
                write_json(st, out)
            elif args.format == "csv":
                alarms = [(f"alarm.{a['alarm']}.{a['subject']}", a["reason"]) for a in st["alarms"]]
                write_metrics([*flat({k: v for k, v in st.items() if k != "alarms"}), *alarms], out)
            else:
                for a in st["alarms"]:
                    print(f"{'alarm ' + a['alarm']:<28} {a['reason']}", file=out)
                for k, v in flat({k: v for k, v in st.items() if k != "alarms"}):
                    if isinstance(v, float):
                        v = f"{v:.4f}" if "rate" in k or k.endswith("psi") else f"{v:.1f}"
                    print(f"{k:<28} {'-' if v is None else v}", file=out)
            return 0
        columns = csv_columns(settings(args).csv.dicom_identifiers)  # the operator's opt-out holds here too
        if args.command == "reviews":
            rows, columns = query_reviews(sessions, args.since), REVIEW_LIST_COLUMNS
        else:
            rows = query_rows(sessions, args)
        table = columns if args.command == "reviews" or args.all_columns else TABLE_COLUMNS
        if args.command != "reviews" and cli_outbox.with_pacs_column(sessions, rows):  # results sent to a PACS
            columns, table = (*columns, "pacs"), (*table, "pacs")
        write_rows(rows, columns, args.format, out, table)
        return 0
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
