"""``xr-results audit`` (the audit trail), ``import`` (an xr-score run into the database) and ``backup``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from xr.core.errors import XRError
from xr.results.cli_common import db_location, open_db, settings, write_rows
from xr.results.engine import make_engine, session_factory


def run_audit(args: argparse.Namespace, out) -> int:
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
    write_rows(rows, AUDIT_COLUMNS, args.format, out)
    return 0


def run_import(args: argparse.Namespace, out) -> int:
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


def run_backup(args: argparse.Namespace, out) -> int:
    """``xr-results backup DEST``: the database, then what else a restore needs."""
    from xr.core.paths import model_path, output_dir
    from xr.results.backup import also_keep, backup

    try:
        cfg = settings(args)
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
