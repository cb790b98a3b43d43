"""``xr-results outbox``: what the daemon owes the PACS, and the ``pacs`` column ``xr-results list`` shows
where results are sent to one."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from xr.core.errors import XRError
from xr.results.cli_common import jsonable, open_db, print_table, settings, write_json, write_rows
from xr.results.engine import session_factory


def with_pacs_column(sessions, rows: list[dict[str, Any]]) -> bool:
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


def run(args: argparse.Namespace, out) -> int:
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
            give_up = settings(args).dicom_send.give_up_after_s
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
        items_out = [{c: jsonable(r[c]) for c in OUTBOX_COLUMNS} for r in rows]
        write_json({"counts": summary, "items": items_out}, out)
    elif args.format == "csv":
        write_rows(rows, OUTBOX_COLUMNS, "csv", out)
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
