"""``xr-results backup DEST``: a consistent copy of a SQLite results database, safe while the daemon writes.

SQLite's online backup API copies the pages in one step, inside one read transaction: in WAL mode that
transaction sees one committed state and never blocks the daemon's writes (a copy in several steps would
restart each time the daemon commits). The copy is checked (``PRAGMA integrity_check``), switched out of
WAL so it is one self-contained file, written private (0600) and renamed into place.

A PostgreSQL database is backed up with the server's own tool: this prints the ``pg_dump`` command.
"""

from __future__ import annotations

import os
import shlex
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import URL, make_url

from xr.core.errors import XRError
from xr.core.files import fsync_dir
from xr.results.engine import db_url, shown_url, sqlite_file


class NotSqlite(XRError):
    """The database is on a server: the message says how to back it up."""


@dataclass
class BackupDone:
    dest: Path
    pages: int
    bytes: int


def pg_dump_command(db: str, dest: str | os.PathLike) -> str:
    """The pg_dump command for a PostgreSQL URL, its password left out (pg_dump reads ~/.pgpass or $PGPASSWORD)."""
    u = make_url(db_url(db))
    url = URL.create("postgresql", u.username, None, u.host, u.port, u.database, u.query)  # libpq's form, no password
    dest = Path(dest)
    target = dest.with_suffix(".dump") if dest.suffix in ("", ".sqlite") else dest
    conn = url.render_as_string(hide_password=False)
    return f"pg_dump --format=custom --file {shlex.quote(str(target))} {shlex.quote(conn)}"


def backup(db: str | os.PathLike, dest: str | os.PathLike, *, force: bool = False) -> BackupDone:
    """Copy the SQLite results database ``db`` to the file ``dest``; raises :class:`NotSqlite` for a server."""
    url = db_url(db)
    if not url.startswith("sqlite:///"):
        raise NotSqlite(
            f"{shown_url(url)} is a PostgreSQL database: back it up with pg_dump (password from ~/.pgpass or "
            f"$PGPASSWORD):\n  {pg_dump_command(url, dest)}\nand restore with pg_restore --clean --if-exists --no-owner -d URL FILE"
        )
    src = sqlite_file(url)
    if not src.is_file():
        raise XRError(f"results database not found: {src}")
    dest = Path(dest).expanduser().absolute()
    if dest.is_dir():
        raise XRError(f"{dest} is a folder: give the backup's file name, e.g. {dest / 'results-backup.sqlite'}")
    if dest.exists():
        if dest.resolve() == src.resolve():
            raise XRError(f"{dest} is the database itself")
        if not force:
            raise XRError(f"{dest} exists (--force to overwrite it)")
    if not dest.parent.is_dir():
        raise XRError(f"no folder {dest.parent}")

    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))  # private from the start
    try:
        # read-only: the backup must not change the live database or its WAL (no checkpoint, no mode change)
        source = sqlite3.connect(f"{src.as_uri()}?mode=ro", uri=True, timeout=30)
        target = sqlite3.connect(tmp)
        try:
            source.execute("PRAGMA busy_timeout=30000")
            source.backup(target, pages=-1)  # one step: one consistent snapshot, however busy the writer
            target.execute("PRAGMA journal_mode=DELETE")  # one file, no -wal beside it
            problems = [r[0] for r in target.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                raise XRError(f"the copy fails its integrity check: {'; '.join(problems[:5])}")
            pages = target.execute("PRAGMA page_count").fetchone()[0]
        finally:
            target.close()
            source.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fchmod(fd, 0o600)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except sqlite3.Error as exc:
        raise XRError(f"backup of {src} failed: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return BackupDone(dest, pages, dest.stat().st_size)


def also_keep(output: Path, model: Path | None, calibration: Path | None, config: str | None) -> list[str]:
    """What the database does not hold and a restore needs, as lines to print."""
    lines = [
        f"{output / 'processed'}, {output / 'failed'}, {output / 'skipped'}: the films (rows name them)",
        f"{output / 'heatmaps'}: the heatmaps xr-review shows",
        f"{output / 'csv'}: the CSV files (they can be rebuilt from the database, not the other way round)",
    ]
    if calibration:
        lines.append(f"{calibration}: the site calibration in use")
    if model:
        lines.append(f"{model} and the calibration beside it: the model the rows were scored with")
    if config:
        lines.append(f"{config}: the settings")
    return lines
