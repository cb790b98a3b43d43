"""What xr-results' sub-commands share: parsing ``--since``, the settings and database their options name,
and printing rows (a table safe for a terminal; JSON)."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
from typing import Any

from xr.results.engine import open_existing
from xr.results.export import csv_cell, format_value


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


def settings(args: argparse.Namespace):
    from xr.core.paths import settings_for

    return settings_for(args.config)


def db_location(args: argparse.Namespace):
    """The database the daemon with these options would use: ``--db``, else ``daemon.db``, else the output's."""
    from xr.core.paths import output_dir, results_db

    cfg = settings(args)
    return results_db(cfg, output_dir(cfg, args.output), args.db)


def open_db(args: argparse.Namespace):
    return open_existing(db_location(args), immediate=False)


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


def flat(d: dict[str, Any], prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def jsonable(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return format_value(v)
    return v


def write_json(data: Any, out) -> None:
    json.dump(data, out, indent=2)
    print(file=out)


def write_rows(rows: list[dict[str, Any]], columns: tuple[str, ...], fmt: str, out, table=None) -> None:
    """``rows`` as JSON objects, CSV (cells a spreadsheet shows as text) or a table of ``table`` columns."""
    if fmt == "json":
        write_json([{c: jsonable(r[c]) for c in columns} for r in rows], out)
    elif fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([csv_cell(r[c]) for c in columns])
    else:
        print_table(rows, table or columns, out)


def write_metrics(pairs, out) -> None:
    """(name, value) pairs as a two-column CSV."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["metric", "value"])
    for k, v in pairs:
        w.writerow([k, "" if v is None else v])
