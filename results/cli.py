"""``xr-results``: list, export and summarise the daemon's results database."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from xr.core.errors import XRError
from xr.results.engine import make_engine, open_existing, session_factory
from xr.results.export import csv_cell, csv_columns, format_value
from xr.results.schema import (
    OUTBOX_STATUSES,
    SCORED,
    STATUSES,
    Result,
    Review,
)
from xr.results.stats import compute_stats, percentile  # noqa: F401 - percentile: xr-results' own, re-exported

TABLE_COLUMNS = ("id", "processed_at", "filename", "status", "probability", "label", "flagged", "error")


def parse_since(text: str) -> dt.datetime:
    """ISO date/time (UTC) or a relative age: ``30m``, ``12h``, ``7d``."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(seconds=float(m.group(1)) * unit)
    try:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--since: expected an ISO date/time or 30m/12h/7d, got {text!r}") from None
    if t.tzinfo is not None:
        t = t.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return t


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


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
    imp = sub.add_parser(
        "import", help="load an xr-score output folder into the database (the one command that writes)"
    )
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


def _settings(args: argparse.Namespace):
    from xr.core.paths import settings_for

    return settings_for(args.config)


def db_location(args: argparse.Namespace):
    """The database the daemon with these options would use: ``--db``, else ``daemon.db``, else the output's."""
    from xr.core.paths import output_dir, results_db

    cfg = _settings(args)
    return results_db(cfg, output_dir(cfg, args.output), args.db)


def open_db(args: argparse.Namespace):
    return open_existing(db_location(args), immediate=False)


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


# wide enough for a whole sha256; a longer path or error is cut and ends in an ASCII "..." (any terminal
# encoding prints it); csv and json give it whole
TABLE_MAX_WIDTH = 64


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (escape sequences that could rewrite the screen or
    the terminal's title) shown as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _fit(value: str, width: int) -> str:
    return value if len(value) <= width else value[: width - 3] + "..."


def print_table(rows: list[dict[str, Any]], columns: tuple[str, ...], out) -> None:
    cells = [[printable(format_value(r[c])) for c in columns] for r in rows]
    for row in cells:
        for i, c in enumerate(columns):
            if c == "probability" and row[i]:
                row[i] = f"{float(row[i]):.4f}"
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    widths = [min(w, TABLE_MAX_WIDTH) for w in widths]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(), file=out)
    for r in cells:
        print("  ".join(_fit(v, w).ljust(w) for v, w in zip(r, widths)).rstrip(), file=out)


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
        return _import(args, out)
    if args.command == "performance":
        from xr.results.cli_performance import run

        return run(args, open_db, out)
    if args.command == "audit":
        return _audit(args, out)
    if args.command == "backup":
        return _backup(args, out)
    if args.command in ("prune", "retry"):
        from xr.results import cli_ops

        return getattr(cli_ops, args.command)(args, db_location, out)
    if args.command == "outbox":
        return _outbox(args, out)
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
                json.dump(st, out, indent=2)
                print(file=out)
            elif args.format == "csv":
                w = csv.writer(out, lineterminator="\n")
                w.writerow(["metric", "value"])
                for k, v in _flat({k: v for k, v in st.items() if k != "alarms"}):
                    w.writerow([k, "" if v is None else v])
                for a in st["alarms"]:
                    w.writerow([f"alarm.{a['alarm']}.{a['subject']}", a["reason"]])
            else:
                for a in st["alarms"]:
                    print(f"{'alarm ' + a['alarm']:<28} {a['reason']}", file=out)
                for k, v in _flat({k: v for k, v in st.items() if k != "alarms"}):
                    if isinstance(v, float):
                        v = f"{v:.4f}" if "rate" in k or k.endswith("psi") else f"{v:.1f}"
                    print(f"{k:<28} {'-' if v is None else v}", file=out)
            return 0
        columns = csv_columns(_settings(args).csv.dicom_identifiers)  # the operator's opt-out holds here too
        if args.command == "reviews":
            rows, columns = query_reviews(sessions, args.since), REVIEW_LIST_COLUMNS
        else:
            rows = query_rows(sessions, args)
        table = columns if args.command == "reviews" or args.all_columns else TABLE_COLUMNS
        if args.command != "reviews" and _with_pacs_column(sessions, rows):  # results sent to a PACS
            columns, table = (*columns, "pacs"), (*table, "pacs")
        if args.format == "json":
            json.dump([{c: _jsonable(r[c]) for c in columns} for r in rows], out, indent=2)
            print(file=out)
        elif args.format == "csv":
            w = csv.writer(out, lineterminator="\n")
            w.writerow(columns)
            for r in rows:
                w.writerow([csv_cell(r[c]) for c in columns])
        else:
            print_table(rows, table, out)
        return 0
    finally:
        engine.dispose()


def _audit(args: argparse.Namespace, out) -> int:
    """``xr-results audit``: the audit trail, oldest first; names typed at the login page are anyone's text,
    so the table escapes control characters and the CSV defuses formulas like every other output."""
    from xr.results import audit
    from xr.results.schema import AUDIT_COLUMNS

    try:
        engine = open_db(args)
    except XRError as exc:
        print(f"xr-results: {exc}", file=sys.stderr)
        return 2
    try:
        with session_factory(engine)() as s:
            rows = audit.query(s, since=args.since, user=args.user, action=args.action)
    finally:
        engine.dispose()
    if args.format == "json":
        json.dump([{c: _jsonable(r[c]) for c in AUDIT_COLUMNS} for r in rows], out, indent=2)
        print(file=out)
    elif args.format == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(AUDIT_COLUMNS)
        for r in rows:
            w.writerow([csv_cell(r[c]) for c in AUDIT_COLUMNS])
    else:
        print_table(rows, AUDIT_COLUMNS, out)
    return 0


def _with_pacs_column(sessions, rows: list[dict[str, Any]]) -> bool:
    """Where the daemon sends results to a PACS: each row's ``pacs`` state (sent: every object reached every
    destination; pending; failed; empty: nothing to send). False, and no column, where nothing was ever sent."""
    from xr.results import outbox

    with sessions() as s:
        if not outbox.counts(s):
            return False
        states = outbox.state_by_result(s, [r["id"] for r in rows])
    for r in rows:
        r["pacs"] = states.get(r["id"])
    return True


def _outbox(args: argparse.Namespace, out) -> int:
    """``xr-results outbox``: what the daemon owes the PACS. Failed items (given up after
    dicom_send.give_up_after_s) are listed with their last error; ``--retry-failed`` queues them again."""
    from xr.results import outbox
    from xr.results.schema import OUTBOX_COLUMNS

    try:
        engine = open_db(args)
    except XRError as exc:
        print(f"xr-results: {exc}", file=sys.stderr)
        return 2
    try:
        sessions = session_factory(engine)
        if args.retry_failed:
            give_up = _settings(args).dicom_send.give_up_after_s
            with sessions.begin() as s:
                n = outbox.retry_failed(s, give_up)
            print(f"xr-results: {n} failed item(s) queued again", file=sys.stderr)
        with sessions() as s:
            counts = outbox.counts(s)
            items = outbox.items(s, args.outbox_status, args.outbox_limit)
            rows = [{c: getattr(i, c) for c in OUTBOX_COLUMNS} for i in items]
    finally:
        engine.dispose()
    if args.since is not None:
        rows = [r for r in rows if r["created_at"] >= args.since]
    if args.format == "json":
        summary = [{"destination": d, "status": st, "items": n} for (d, st), n in sorted(counts.items())]
        items_out = [{c: _jsonable(r[c]) for c in OUTBOX_COLUMNS} for r in rows]
        json.dump({"counts": summary, "items": items_out}, out, indent=2)
        print(file=out)
    elif args.format == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(OUTBOX_COLUMNS)
        for r in rows:
            w.writerow([csv_cell(r[c]) for c in OUTBOX_COLUMNS])
    else:
        for (d, st), n in sorted(counts.items()):
            print(f"{d:<40} {st:<8} {n}", file=out)
        if not counts:
            print("outbox empty (no dicom_send.destinations / --send-results, or no DICOM film scored yet)", file=out)
        if rows:
            print(file=out)
            print_table(rows, OUTBOX_TABLE_COLUMNS, out)
    failed = sum(n for (_, st), n in counts.items() if st == "failed")
    if failed and not args.retry_failed:
        print(
            f"xr-results: {failed} object(s) did not reach the PACS; fix the cause, then xr-results outbox --retry-failed",
            file=sys.stderr,
        )
    return 0


OUTBOX_TABLE_COLUMNS = (
    "id",
    "result_id",
    "kind",
    "destination",
    "status",
    "attempts",
    "created_at",
    "sent_at",
    "last_error",
)


def _import(args: argparse.Namespace, out) -> int:
    """``xr-results import RUN``: an xr-score run into the results database (created or upgraded if need be)."""
    try:
        from xr.score.bulk import import_run

        engine = make_engine(db_location(args))
        try:
            n, skipped = import_run(args.run, session_factory(engine))
        finally:
            engine.dispose()
    except XRError as exc:
        print(f"xr-results: {exc}", file=sys.stderr)
        return 2
    print(f"imported {n} rows from {args.run} ({skipped} already there)", file=out)
    return 0


def _backup(args: argparse.Namespace, out) -> int:
    """``xr-results backup DEST``: the database, then what else a restore needs."""
    from xr.core.paths import model_path, output_dir
    from xr.results.backup import also_keep, backup

    try:
        cfg = _settings(args)
        output = output_dir(cfg, args.output)
        done = backup(db_location(args), args.dest, force=args.force)
    except XRError as exc:  # PostgreSQL too: the message gives the pg_dump command
        print(f"xr-results: {exc}", file=sys.stderr)
        return 2
    print(f"backed up the results database to {done.dest} ({done.bytes} bytes, integrity ok)", file=out)
    calibration = Path(cfg.daemon.calibration).expanduser() if cfg.daemon.calibration else None
    print("the database does not hold these; keep them too:", file=out)
    for line in also_keep(output, model_path(cfg), calibration, args.config or os.environ.get("XR_CONFIG")):
        print(f"  {line}", file=out)
    return 0


def _flat(d: dict[str, Any], prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _jsonable(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return format_value(v)
    return v


if __name__ == "__main__":
    sys.exit(main())
