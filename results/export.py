"""Rolling CSV files written from the database (the CSVs follow the DB, never the other way round).

After each batch (at most once a second in a stream: the finisher paces it) the exporter takes the
final rows with id above the last exported id, up to (not including) the lowest row still ``claimed``,
so rows finish in any order but reach the CSVs in id order and none is skipped. Each update appends the
new rows to their file and fsyncs it (a new file is written whole and renamed into place), so an update
costs what it writes, not the day's file. The last exported id is kept in the DB, and each file's own last
id guards it: ids only grow within a file, so a row at or below a file's last id is already in it. A crash
mid-append can leave a cut last line; it is not a row (only whole lines count) and is cut off before the
next append. A crash between the appends and the DB update therefore never writes a row twice nor skips
one, whether one update touched one file or two (daily files across midnight).

Cells are written for spreadsheets: text that a spreadsheet would run as a formula (starting with ``=``,
``+``, ``-``, ``@``, a tab or a carriage return, and not a number) gets a leading ``'`` (OWASP's CSV
injection rule). Files are private to the service account (core/files.py).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from xr.core.files import fsync_dir, make_dirs, open_append, write_private
from xr.results.engine import get_meta, set_meta
from xr.results.journal import settled_horizon
from xr.results.rows import insert_or_ignore
from xr.results.schema import (
    DICOM_COLUMNS,
    EXPORT_COLUMNS,
    FINAL_STATUSES,
    REVIEW_COLUMNS,
    SCORED,
    Meta,
    Result,
    Review,
    Status,
)

RESULTS_PREFIX = "results-"
FLAGGED_NAME = "flagged.csv"
FILE_PATTERNS = {"daily": re.compile(r"results-\d{4}-\d{2}-\d{2}\.csv"), "rows": re.compile(r"results-\d{6,}\.csv")}


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="milliseconds") + "Z"
    if isinstance(value, float):
        return repr(round(value, 6)) if abs(value) < 1e15 else repr(value)
    return str(value).replace("\r", " ").replace("\n", " ")


def csv_columns(dicom_identifiers: bool = True) -> tuple[str, ...]:
    """The CSV columns: those of ``results`` the CSVs carry, the DICOM identifiers unless opted out."""
    return EXPORT_COLUMNS if dicom_identifiers else tuple(c for c in EXPORT_COLUMNS if c not in DICOM_COLUMNS)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """``value`` as a CSV cell a spreadsheet shows as text: a formula-like string gets a leading ``'``."""
    text = format_value(value)
    if isinstance(value, str) and text.startswith(_FORMULA_START) and not _is_number(text):
        return "'" + text
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def rows_to_csv(rows: Iterable[dict[str, Any]], header: bool, columns: tuple[str, ...] = EXPORT_COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(columns)
    for r in rows:
        w.writerow([csv_cell(r[c]) for c in columns])
    return buf.getvalue()


def append_csv(path: Path, text: str, header: str = "") -> None:
    """Append ``text`` (whole lines) to ``path`` and fsync; a new file is written whole as ``header + text``.
    A cut last line a crash left is removed first, so the new rows start on a line of their own."""
    if not os.path.lexists(path):
        write_private(path, (header + text).encode())
        return
    fd = open_append(path)
    try:
        if _drop_cut_line(fd) == 0:
            text = header + text  # nothing whole was left, not even the header
        data = memoryview(text.encode())
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_cut_line(fd: int) -> int:
    """Cut the file behind ``fd`` back to its last newline (a crash may have left part of a line); returns
    its size after that."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        if end == size and chunk.endswith(b"\n"):
            return size
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            os.ftruncate(fd, start + nl + 1)
            return start + nl + 1
        end = start
    os.ftruncate(fd, 0)
    return 0


def header_of(path: Path) -> str | None:
    """The first line of ``path`` (None when absent)."""
    if not path.exists():
        return None
    with open(path, newline="") as f:
        return f.readline().rstrip("\n")


def last_id_in_csv(path: Path) -> int:
    """The id in the last data row of ``path`` (0 when absent or header only)."""
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 65536))
        tail = f.read().decode(errors="replace")
    lines = tail.split("\n")[:-1]  # whole lines only: what follows the last newline is a cut line
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        return 0
    first = next(csv.reader([lines[-1]]))[0]
    return int(first) if first.isdigit() else 0


def count_rows(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return max(0, sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) - 1)


EXPORTER_LOCK = 7_265_081_133  # PostgreSQL advisory lock key: the one worker that writes the shared CSVs


class CsvExporter:
    """``elect``: several workers share the database and the output folder; the one holding a PostgreSQL
    advisory lock writes the CSVs, the others skip (one file set, each row once, in id order). If that
    worker dies its connection closes, the lock goes, and the next worker to try takes over from the files
    and the database as they are. Each update also holds the ``last_exported_id`` row locked from reading
    the files to recording them, so a worker that lost the lock after checking it (a server restart, a cut
    connection) waits its turn and then sees what the other one wrote."""

    def __init__(
        self,
        csv_dir: str | Path,
        sessions: sessionmaker[Session],
        rotation: str = "daily",
        max_rows: int = 10_000,
        columns: tuple[str, ...] = EXPORT_COLUMNS,
        elect: bool = False,
    ):
        self.columns = columns
        self.dir = Path(csv_dir)
        self.dir = make_dirs(self.dir)
        self.sessions = sessions
        self.rotation = rotation
        self.max_rows = max(1, max_rows)
        self.flagged_path = self.dir / FLAGGED_NAME
        self.elect = elect
        self._lock_conn = None  # holds the advisory lock while this worker is the exporter
        self._mark_exists = False  # the last_exported_id row that each update locks (``_fence``)
        self._load_state()

    def elected(self) -> bool:
        """Whether this process writes the CSVs (always, unless ``elect``: then while it holds the lock)."""
        if not self.elect:
            return True
        if self._lock_conn is not None:
            try:  # the lock lives as long as its session: a server restart or a cut connection ends both
                self._lock_conn.exec_driver_sql("SELECT 1")
                self._lock_conn.commit()
                return True
            except Exception:  # noqa: BLE001 - lost: try to be elected again below
                self.release()
        conn = None
        try:
            conn = self.sessions.kw["bind"].connect()
            got = conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({EXPORTER_LOCK})").scalar()
            conn.commit()
        except Exception:  # noqa: BLE001 - the database is away: try again at the next export
            if conn is not None:
                conn.invalidate()
            return False
        if not got:
            conn.close()
            return False
        self._lock_conn = conn  # where the CSVs stand is read under the export mark (``_export_fenced``)
        return True

    def release(self) -> None:
        """Stop being the exporter. The lock belongs to the database session, which a pooled connection
        outlives: the connection is closed for good, not returned to the pool."""
        if self._lock_conn is not None:
            conn, self._lock_conn = self._lock_conn, None
            try:
                conn.invalidate()
                conn.close()
            except Exception:  # noqa: BLE001 - already gone
                pass

    def _load_state(self, last_exported: int | None = None) -> None:
        """Where the CSVs stand: the database's export mark, then the files themselves."""
        rotation = self.rotation
        if last_exported is None:
            with self.sessions() as s:
                last_exported = int(get_meta(s, "last_exported_id", "0") or 0)
        self.last_id = last_exported
        self._file_last: dict[Path, int] = {}  # last id written to each file this exporter touched
        self.flagged_last_id = self._start_if_columns_changed(self.flagged_path)
        # Files of the other rotation (the setting was changed) hold rows of an older update: none of them
        # may be written again.
        for mode in FILE_PATTERNS:
            if mode != rotation and (other := self._latest_file(mode)) is not None:
                self.last_id = max(self.last_id, last_id_in_csv(other))
        latest = self._latest_file(rotation)
        if rotation == "rows" and latest is not None:
            self.last_id = max(self.last_id, last_id_in_csv(latest))  # files fill in id order
        self._current: Path | None = latest
        self._current_rows = count_rows(latest) if latest and rotation == "rows" else 0  # daily files do not fill up

    def _latest_file(self, rotation: str) -> Path | None:
        files = sorted(p for p in self.dir.glob(f"{RESULTS_PREFIX}*.csv") if FILE_PATTERNS[rotation].fullmatch(p.name))
        return files[-1] if files else None

    def _last_in(self, path: Path) -> int:
        if path not in self._file_last:
            self._file_last[path] = self._start_if_columns_changed(path)
        return self._file_last[path]

    def _start_if_columns_changed(self, path: Path) -> int:
        """The last id ``path`` holds. A file written with other columns (before an upgrade) is renamed to
        ``<name>.old-columns[-N].csv`` so the rows that follow start a file of their own; its last id still
        guards against writing a row twice."""
        last = last_id_in_csv(path)
        found = header_of(path)
        if found is not None and found != rows_to_csv([], header=True, columns=self.columns).rstrip("\n"):
            k = 0
            while (aside := path.with_name(f"{path.stem}.old-columns{f'-{k}' if k else ''}.csv")).exists():
                k += 1
            os.replace(path, aside)
            fsync_dir(path.parent)
        return last

    def _target(self, row: dict[str, Any]) -> Path:
        if self.rotation == "daily":
            day = (row["processed_at"] or dt.datetime.utcnow()).strftime("%Y-%m-%d")
            return self.dir / f"{RESULTS_PREFIX}{day}.csv"
        if self._current is None or self._current_rows >= self.max_rows:
            idx = 1
            if self._current is not None:
                stem = self._current.stem[len(RESULTS_PREFIX) :]
                idx = int(stem) + 1 if stem.isdigit() else 1
            self._current = self.dir / f"{RESULTS_PREFIX}{idx:06d}.csv"
            self._current_rows = count_rows(self._current)
        return self._current

    def pending_rows(self, s: Session, horizon: int | None) -> list[dict[str, Any]]:
        """Final rows after ``last_id`` that no claim with a lower id holds back, up to ``horizon``
        (``journal.settled_horizon``)."""
        min_claimed = s.scalar(
            select(func.min(Result.id)).where(Result.status == Status.CLAIMED, Result.id > self.last_id)
        )
        # the columns, not ORM objects: half the cost per row, paid while the pipeline's other threads wait for the GIL
        stmt = select(*(getattr(Result, c) for c in EXPORT_COLUMNS))
        stmt = stmt.where(Result.id > self.last_id, Result.status.in_(FINAL_STATUSES))
        if min_claimed is not None:
            stmt = stmt.where(Result.id < min_claimed)
        if horizon is not None:
            stmt = stmt.where(Result.id <= horizon)
        return [dict(m) for m in s.execute(stmt.order_by(Result.id)).mappings()]

    def export(self) -> int:
        """Append every exportable row; returns how many were written (not counting rows a crash had
        already written)."""
        if not self.elected():
            return 0
        if self.elect:
            return self._export_fenced()
        with self.sessions() as s:
            rows = self.pending_rows(s, settled_horizon(s))
        written = self._append(rows)
        if rows:
            with self.sessions.begin() as s:
                set_meta(s, "last_exported_id", self.last_id)
        return written

    def _export_fenced(self) -> int:
        with self.sessions() as s:
            horizon = settled_horizon(s)  # ends its own transaction: claims wait on it only for a moment
        with self.sessions.begin() as s:
            mark = self._fence(s)
            if mark is None:
                return 0  # another worker is writing the CSVs right now
            reloaded = mark != self.last_id
            if reloaded:
                self._load_state(mark)  # another worker exported since
            rows = self.pending_rows(s, horizon)
            if not rows:
                return 0
            if not reloaded:  # the files as whoever wrote last left them, even without recording it
                self._load_state(mark)
            written = self._append(rows)
            set_meta(s, "last_exported_id", self.last_id)
        return written

    def _fence(self, s: Session) -> int | None:
        """Lock the export mark for this transaction (None: another exporter holds it). A session frozen
        while it holds the mark keeps it: the CSVs wait rather than take a row twice."""
        if not self._mark_exists:
            mark = insert_or_ignore(s, Meta).values(key="last_exported_id", value="0")
            s.execute(mark.on_conflict_do_nothing(index_elements=["key"]))
            self._mark_exists = True
        s.execute(text("SET LOCAL idle_in_transaction_session_timeout = 0"))
        stmt = select(Meta.value).where(Meta.key == "last_exported_id").with_for_update(skip_locked=True)
        value = s.execute(stmt).scalar()
        return None if value is None else int(value or 0)

    def _append(self, rows: list[dict[str, Any]]) -> int:
        """Append ``rows`` (in id order) to their files, flagged.csv first; ``last_id`` moves past them."""
        if not rows:
            return 0
        groups: dict[Path, list[dict[str, Any]]] = {}
        for r in rows:
            target = self._target(r)
            if r["id"] <= self._last_in(target):
                continue  # written before a crash that came ahead of the DB update
            if target != self._current:
                self._current, self._current_rows = target, count_rows(target)
            groups.setdefault(target, []).append(r)
            self._current_rows += 1
        header = rows_to_csv([], header=True, columns=self.columns)
        # flagged.csv first: the results files are what a restart could mistake for "exported"
        flagged = [r for r in rows if r["status"] in SCORED and r["flagged"] and r["id"] > self.flagged_last_id]
        if flagged:
            append_csv(self.flagged_path, rows_to_csv(flagged, header=False, columns=self.columns), header=header)
            self.flagged_last_id = flagged[-1]["id"]
        for path, group in groups.items():
            append_csv(path, rows_to_csv(group, header=False, columns=self.columns), header=header)
            self._file_last[path] = group[-1]["id"]
        self.last_id = rows[-1]["id"]
        return sum(len(g) for g in groups.values())


REVIEWS_NAME = "reviews.csv"


def export_reviews(csv_dir: str | Path, sessions: sessionmaker[Session]) -> int:
    """Append the reviews ``reviews.csv`` does not hold yet (ids only grow: the file's last id says which)."""
    path = Path(csv_dir) / REVIEWS_NAME
    make_dirs(path.parent)
    last = last_id_in_csv(path)
    with sessions() as s:
        rows = [
            dict(m)
            for m in s.execute(
                select(*(getattr(Review, c) for c in REVIEW_COLUMNS)).where(Review.id > last).order_by(Review.id)
            ).mappings()
        ]
    if rows:
        header = rows_to_csv([], header=True, columns=REVIEW_COLUMNS)
        append_csv(path, rows_to_csv(rows, header=False, columns=REVIEW_COLUMNS), header=header)
    return len(rows)
