"""``xr-results prune`` and ``xr-results retry``: the two operator actions that change the output folder
(results/retention.py, results/retry.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xr.core.errors import XRError
from xr.results.engine import open_existing, session_factory


def add_parsers(sub, common) -> None:
    pr = sub.add_parser(
        "prune", help="delete films, heatmaps, CSVs and rows older than config.yaml's retention: section"
    )
    common(pr, False)
    pr.add_argument("--dry-run", action="store_true", help="delete nothing; print what a prune would delete")
    rt = sub.add_parser("retry", help="put films from failed/ back into the inbox; the old rows are kept and linked")
    common(rt, False)
    rt.add_argument("ids", nargs="+", type=int, metavar="ID", help="result row ids (xr-results --status error)")
    rt.add_argument("--watch", help="the inbox to put them in (default: daemon.watch)")
    rt.add_argument("--skipped", action="store_true", help="also films in skipped/ (rows with status skipped)")


def _open(args, db_location):
    from xr.core.paths import output_dir, settings_for

    cfg = settings_for(args.config)
    return cfg, output_dir(cfg, args.output), open_existing(db_location(args), immediate=False)


def prune(args: argparse.Namespace, db_location, out) -> int:
    from xr.results.retention import COUNTS, enabled, prune

    try:
        cfg, output, engine = _open(args, db_location)
    except XRError as exc:
        print(f"xr-results: {exc}", file=sys.stderr)
        return 2
    try:
        if not enabled(cfg.retention):
            print("retention: keeps everything (no retention.*_days set in config.yaml); nothing to prune", file=out)
            return 0
        counts = prune(session_factory(engine), output, cfg.retention, dry_run=args.dry_run)
    finally:
        engine.dispose()
    if counts is None:
        print("xr-results: another worker is pruning this database now; nothing done", file=sys.stderr)
        return 1
    verb = "would delete" if args.dry_run else "deleted"
    shown = ", ".join(f"{counts[k]} {k}" for k in COUNTS if k != "kept_unreviewed")
    print(f"retention: {verb} {shown}", file=out)
    print(f"retention: kept {counts['kept_unreviewed']} old cases waiting for a reader", file=out)
    return 0


def retry(args: argparse.Namespace, db_location, out) -> int:
    from xr.results.retry import retry

    try:
        cfg, output, engine = _open(args, db_location)
    except XRError as exc:
        print(f"xr-results: {exc}", file=sys.stderr)
        return 2
    inbox = args.watch or cfg.daemon.watch
    if not inbox:
        print("xr-results: retry needs the inbox: --watch DIR (or daemon.watch in config.yaml)", file=sys.stderr)
        return 2
    try:
        done = retry(session_factory(engine), output, Path(inbox).expanduser(), args.ids, skipped=args.skipped)
    except OSError as exc:
        print(f"xr-results: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    for o in done:
        if o.to:
            print(f"row {o.row_id}: film back in the inbox as {o.to}", file=out)
        else:
            print(f"xr-results: {o.reason}", file=sys.stderr)
    return 0 if all(o.to for o in done) else 1
