"""The results database: SQLAlchemy 2.0 models, engine factory and the few queries the daemon needs.

The database is the daemon's journal (docs/design.md): a row is written with status ``claimed``
before a file is decoded, the batch commit turns it into ``ok`` / ``error`` / ``duplicate`` in one
transaction, and only then is the file moved (``moved_to`` is chosen in that commit, ``moved_at`` is set
after the move).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    insert,
    inspect,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, Row
from sqlalchemy.exc import ArgumentError, DatabaseError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from xr.core.dicom import IDENTIFIERS
from xr.core.errors import XRError

SCHEMA_VERSION = 5  # the head revision of daemon/migrations (0005)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"

CLAIMED, OK, ERROR, DUPLICATE, SKIPPED = "claimed", "ok", "error", "duplicate", "skipped"
FINAL_STATUSES = (OK, ERROR, DUPLICATE, SKIPPED)
SCORED = (OK, DUPLICATE)  # rows with a score: a duplicate carries its first result's
STATUSES = (CLAIMED, *FINAL_STATUSES)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Result(Base):
    """One row per file dropped into the inbox."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(Text)  # absolute path where the file was found in the inbox
    filename: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)  # with path + size: the file's identity in the inbox
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    duplicate_of: Mapped[int | None] = mapped_column(ForeignKey("results.id"))
    logit: Mapped[float | None] = mapped_column(Float)
    probability: Mapped[float | None] = mapped_column(Float)  # calibrated: sigmoid(logit / T)
    threshold: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str | None] = mapped_column(String(32))
    flagged: Mapped[bool | None] = mapped_column(Boolean, index=True)
    model_id: Mapped[str | None] = mapped_column(Text)
    temperature: Mapped[float | None] = mapped_column(Float)
    calibration_id: Mapped[str | None] = mapped_column(String(64), index=True)  # -> calibrations.id
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"))
    received_at: Mapped[dt.datetime] = mapped_column(index=True)  # first seen by the daemon (UTC)
    claimed_at: Mapped[dt.datetime]
    processed_at: Mapped[dt.datetime | None] = mapped_column(index=True)  # batch commit (UTC)
    latency_ms: Mapped[float | None] = mapped_column(Float)  # processed_at - received_at
    moved_to: Mapped[str | None] = mapped_column(Text)  # processed/, failed/ or skipped/ destination; None: left
    moved_at: Mapped[dt.datetime | None]
    # DICOM inputs only (core/dicom.py IDENTIFIERS); empty for PNG/JPEG
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    modality: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(16))
    heatmap_path: Mapped[str | None] = mapped_column(Text)  # <output>/heatmaps/<id>.png: where the model looked
    # several workers on one database (docs/operations.md, "Several hosts"): the worker that scored the row;
    # the one that holds it until its file is moved, the lease's fencing token and when it runs out (the
    # database's clock, epoch seconds)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    lease_holder: Mapped[str | None] = mapped_column(String(128))
    lease_token: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_expires_at: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        Index("ix_results_identity", "path", "size_bytes", "mtime_ns"),
        Index("ux_results_inbox_identity", "path", "size_bytes", "mtime_ns", unique=True,
              sqlite_where=text("moved_at IS NULL"), postgresql_where=text("moved_at IS NULL")),
    )

    def as_dict(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in EXPORT_COLUMNS}


DICOM_COLUMNS = tuple(IDENTIFIERS)
EXPORT_COLUMNS = (
    "id", "path", "filename", "sha256", "size_bytes", "status", "error", "duplicate_of", "logit",
    "probability", "threshold", "label", "flagged", "model_id", "temperature", "calibration_id", "batch_id",
    "received_at", "processed_at", "latency_ms", "moved_to", "worker_id", *DICOM_COLUMNS,
)  # fmt: skip


class Batch(Base):
    """One micro-batch: its size and where its time went."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[dt.datetime]
    size: Mapped[int]
    n_ok: Mapped[int] = mapped_column(default=0)
    n_error: Mapped[int] = mapped_column(default=0)
    n_duplicate: Mapped[int] = mapped_column(default=0)
    wait_ms: Mapped[float] = mapped_column(Float, default=0.0)  # first item ready -> batch closed
    model_ms: Mapped[float] = mapped_column(Float, default=0.0)
    model_id: Mapped[str | None] = mapped_column(Text)


class CalibrationRecord(Base):
    """A calibration the daemon scored with: its parameters and the score distribution it expects."""

    __tablename__ = "calibrations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # core.calibration.Calibration.id
    model_id: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(32))  # validation | site | none
    path: Mapped[str | None] = mapped_column(Text)
    temperature: Mapped[float] = mapped_column(Float)
    shift: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    reference: Mapped[str | None] = mapped_column(Text)  # JSON: what a stream scored by it should look like
    first_used_at: Mapped[dt.datetime]


DECISIONS = ("confirm", "dismiss")


class Review(Base):
    """A reader's decision on a flagged case (xr-review); a case with one has left the queue."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    decision: Mapped[str] = mapped_column(String(16))  # confirm | dismiss
    note: Mapped[str | None] = mapped_column(Text)
    reviewer: Mapped[str | None] = mapped_column(String(128))
    reviewed_at: Mapped[dt.datetime]


REVIEW_COLUMNS = ("id", "result_id", "decision", "note", "reviewer", "reviewed_at")


class Meta(Base):
    """Key/value: ``schema_version``, ``last_exported_id``."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


# -- paths as the database holds them --------------------------------------------------------------
_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")


def storable(path: str) -> str:
    """``path`` as text SQLite can hold. A file name that is not valid UTF-8 reaches Python with its bad
    bytes as surrogates, which no UTF-8 database, CSV or JSON log accepts: those bytes are written as
    ``\\xNN`` instead. The file itself keeps its name until it is moved, to that escaped name."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def fs_path(stored: str) -> str:
    """The file a stored path names: ``stored`` itself, or the name :func:`storable` escaped."""
    if "\\x" not in stored or os.path.lexists(stored):
        return stored
    raw = _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), stored)
    return raw if os.path.lexists(raw) else stored


# -- engine ------------------------------------------------------------------------------------------
IDLE_IN_TRANSACTION_MS = 30_000  # the daemon's transactions last milliseconds


def db_url(db: str | Path) -> str:
    """A SQLAlchemy URL as is, a path -> ``sqlite:///<absolute path>``; only SQLite and PostgreSQL."""
    s = str(db)
    if "://" in s:
        if not s.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
            raise XRError(f"results database {s!r}: use a SQLite file path or a postgresql+psycopg://USER@HOST:PORT/DB URL")
        if s.startswith("postgresql://"):  # SQLAlchemy's default driver for it is psycopg2; we ship psycopg 3
            s = "postgresql+psycopg://" + s[len("postgresql://"):]
        return s
    return f"sqlite:///{Path(s).expanduser().resolve()}"


def make_engine(db: str | Path, *, create: bool = True, immediate: bool = True) -> Engine:
    """Engine with SQLite pragmas set on every connection; creates the schema when ``create``.

    ``immediate``: every transaction starts with ``BEGIN IMMEDIATE`` (takes the write lock at once and
    waits up to busy_timeout for it), so concurrent writers never fail with a lock upgrade error.
    """
    url = db_url(db)
    try:
        if url.startswith("sqlite:///") and create:
            sqlite_file(url).parent.mkdir(parents=True, exist_ok=True)
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30})
        else:
            # A server across the network: pooled connections are tested before use, connecting gives up
            # in 10 s, and a session left inside a transaction (its worker frozen or cut off) is ended by
            # the server so that its row locks do not hold the other workers up.
            engine = create_engine(url, pool_pre_ping=True, connect_args={
                "connect_timeout": 10, "options": f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}"})
    except ImportError as exc:
        hint = " (pip install 'xr-triage[postgresql]')" if url.startswith("postgresql") else ""
        raise XRError(f"cannot open results database {url}: its driver is not installed{hint}: {exc}") from None
    except (ArgumentError, OSError) as exc:  # a URL of an unknown or uninstalled driver, a bad folder
        raise XRError(f"cannot open results database {url}: {exc}") from None
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            if create:  # the writer; a reader (xr-results) must not rewrite the file it is asked to read
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):  # noqa: ANN001
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    try:
        if create:
            init_schema(engine)
        else:
            check_schema(engine)
    except OperationalError as exc:  # read-only folder, a locked or unreachable server...
        engine.dispose()
        raise XRError(f"cannot open results database {url}: {exc.orig or exc}") from None
    return engine


def open_existing(db: str | Path, *, immediate: bool = True) -> Engine:
    """An engine on a results database a daemon made (xr-results, xr-review): a missing SQLite file is an
    error, not a new empty database."""
    url = db_url(db)
    if url.startswith("sqlite:///") and not sqlite_file(url).exists():
        raise XRError(f"results database not found: {sqlite_file(url)}")
    return make_engine(db, create=False, immediate=immediate)


def sqlite_file(url: str) -> Path:
    """The file of a ``sqlite:///`` URL, also in SQLite's URI form (``sqlite:///file:PATH?mode=ro&uri=true``)."""
    path = url[len("sqlite:///"):].split("?", 1)[0]
    return Path(path[len("file:"):] if path.startswith("file:") else path)


MIGRATION_LOCK = 7_265_081_132  # PostgreSQL advisory lock key held while the schema is created or upgraded


def _alembic(connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def init_schema(engine: Engine) -> None:
    """Create or upgrade the schema through the migrations in daemon/migrations (Alembic), in one transaction.

    A database made before the migrations existed (schema version 1, no ``alembic_version``) is stamped
    as revision 0001 first, then upgraded like any other.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # workers starting together: one migrates, the others wait for it
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        current = MigrationContext.configure(conn).get_current_revision()
        version = _schema_version(conn)
        if version is not None and version > SCHEMA_VERSION:
            raise XRError(
                f"results database schema version {version} is newer than this xr-daemon "
                f"(version {SCHEMA_VERSION}); upgrade xr-triage"
            )
        cfg = _alembic(conn)
        if current is None and version == 1:
            command.stamp(cfg, "0001")
        command.upgrade(cfg, "head")
        with Session(bind=conn) as s:
            set_meta(s, "schema_version", SCHEMA_VERSION)
            s.flush()


def _schema_version(conn) -> int | None:
    """``meta.schema_version`` of the database behind ``conn``, or None where there is none yet."""
    if not inspect(conn).has_table("meta"):
        return None
    value = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar()
    return None if value is None else int(value)


def check_schema(engine: Engine) -> None:
    """For readers: the database is an xr-triage results database of this version (they never migrate it)."""
    try:
        with engine.connect() as conn:
            version = _schema_version(conn)
    except DatabaseError as exc:
        if "not a database" in str(exc):
            raise XRError(f"not an xr-triage results database: {engine.url}") from None
        raise XRError(f"cannot read results database {engine.url}: {exc.orig or exc}") from None
    if version is None:
        raise XRError(f"not an xr-triage results database: {engine.url}")
    if version < SCHEMA_VERSION:
        raise XRError(
            f"results database {engine.url} has schema version {version}, this version reads {SCHEMA_VERSION}: "
            "start xr-daemon on it once to upgrade it in place"
        )
    if version > SCHEMA_VERSION:
        raise XRError(f"results database schema version {version} is newer than this program (version {SCHEMA_VERSION}); upgrade xr-triage")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def get_meta(s: Session, key: str, default: str | None = None) -> str | None:
    row = s.get(Meta, key)
    return default if row is None else row.value


def set_meta(s: Session, key: str, value: Any) -> None:
    row = s.get(Meta, key)
    if row is None:
        s.add(Meta(key=key, value=str(value)))
    else:
        row.value = str(value)


Identity = tuple[str, int, int]  # (path, size_bytes, mtime_ns) of a file in the inbox


def insert_rows(s: Session, rows: list[dict[str, Any]]) -> list[int]:
    """Insert these ``results`` rows; their ids, in the order given.

    INSERT ... RETURNING where the database can return ids in parameter order (SQLAlchemy batches the rows
    on PostgreSQL; on SQLite 3.35+ it is still one statement per row, minus the ORM's per-object work);
    elsewhere (MySQL, older SQLite) one plain INSERT per row, each id read from its cursor.
    """
    if not rows:
        return []
    if s.get_bind().dialect.insert_executemany_returning_sort_by_parameter_order:
        stmt = insert(Result).returning(Result.id, sort_by_parameter_order=True)
        return list(s.scalars(stmt, rows))
    return [s.execute(insert(Result).values(**row)).inserted_primary_key[0] for row in rows]


def insert_or_ignore(s: Session, table: Any):
    """The dialect's INSERT, which has ``on_conflict_do_nothing`` (SQLite and PostgreSQL spell it alike)."""
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    return dialect_insert(table)


def record_calibration(s: Session, predictor: Any) -> None:
    """The predictor's calibration in ``calibrations`` (once per id): rows name it, the drift watch reads
    its reference. Workers starting together may both record it: the first insert wins."""
    cal = predictor.calibration
    stmt = insert_or_ignore(s, CalibrationRecord).values(
        id=cal.id, model_id=predictor.model_id, kind=cal.kind, path=cal.source, temperature=cal.temperature,
        shift=cal.shift, threshold=cal.threshold, first_used_at=utcnow(),
        reference=json.dumps(cal.reference) if cal.reference is not None else None,
    )  # fmt: skip
    s.execute(stmt.on_conflict_do_nothing(index_elements=["id"]))


def delete_rows(s: Session, ids: list[int]) -> None:
    """Delete these ``results`` rows (claims given back: their files are new work again)."""
    if ids:
        s.execute(delete(Result).where(Result.id.in_(ids)))


def update_rows(s: Session, rows: list[dict[str, Any]]) -> None:
    """Update ``results`` rows by primary key (each dict has ``id``), as one executemany per set of keys."""
    if rows:
        s.execute(update(Result), rows)


def scores_by_id(s: Session, ids: list[int]) -> dict[int, dict[str, Any]]:
    """id -> {logit, probability, label, flagged} of these rows, in one query."""
    if not ids:
        return {}
    stmt = select(Result.id, Result.logit, Result.probability, Result.label, Result.flagged)
    return {r.id: r._asdict() for r in s.execute(stmt.where(Result.id.in_(set(ids))))}


def first_ok_by_sop(s: Session, sops: list[str]) -> dict[str, int]:
    """SOPInstanceUID -> id of the first ``ok`` row of that DICOM instance (re-exports differ in bytes)."""
    if not sops:
        return {}
    out: dict[str, int] = {}
    stmt = select(Result.sop_instance_uid, Result.id).where(Result.sop_instance_uid.in_(set(sops)), Result.status == OK)
    for sop, rid in s.execute(stmt.order_by(Result.id)):
        out.setdefault(sop, rid)
    return out


def first_ok_by_sha(s: Session, shas: list[str]) -> dict[str, int]:
    """sha256 -> id of the first ``ok`` row with that content."""
    if not shas:
        return {}
    out: dict[str, int] = {}
    stmt = select(Result.sha256, Result.id).where(Result.sha256.in_(set(shas)), Result.status == OK)
    for sha, rid in s.execute(stmt.order_by(Result.id)):
        out.setdefault(sha, rid)
    return out


# -- claims and leases: several workers on one database ---------------------------------------------------
def db_time(s: Session) -> float:
    """Now on the database's clock (epoch seconds), which all workers share; the local clock on SQLite."""
    if s.get_bind().dialect.name == "postgresql":
        return float(s.execute(text("SELECT extract(epoch from clock_timestamp())")).scalar())
    import time

    return time.time()


# PostgreSQL advisory lock between claims and the CSV exporter. A sequence hands out ids outside any
# transaction, so a claim not yet committed can hold a lower id than rows already final; every claim
# transaction holds this lock shared, and the exporter takes it alone for a moment to learn the highest id
# that no claim in flight can undercut (export.py ``pending_rows``). SQLite has one writer: ids come in order.
CLAIM_FENCE = 7_265_081_134


def claim_fence(s: Session) -> None:
    """Call first in a transaction that inserts claims."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": CLAIM_FENCE})


def settled_horizon(s: Session) -> int | None:
    """PostgreSQL: the highest row id once every claim transaction in flight has ended; rows up to it can
    no longer be joined by a lower id. Ends the session's transaction. None on SQLite (no need)."""
    if s.get_bind().dialect.name != "postgresql":
        return None
    s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": CLAIM_FENCE})
    horizon = s.scalar(select(func.max(Result.id)))
    s.commit()
    return horizon or 0


def try_claim(s: Session, row: dict[str, Any]) -> int | None:
    """Insert a ``claimed`` row unless another row already owns the file (``ux_results_inbox_identity``):
    its id, or None. The database decides, atomically, which worker gets a file."""
    stmt = insert_or_ignore(s, Result).values(**row).on_conflict_do_nothing(
        index_elements=["path", "size_bytes", "mtime_ns"], index_where=Result.moved_at.is_(None)
    ).returning(Result.id)
    return s.execute(stmt).scalar()


def owner_of(s: Session, identity: Identity) -> Row | None:
    """The row that owns an inbox file, locked until the transaction ends (PostgreSQL; SQLite's write lock
    covers it already). None as well when another transaction has it locked: its worker is busy with it."""
    path, size, mtime = identity
    stmt = select(Result.id, Result.status, Result.lease_holder, Result.lease_token, Result.lease_expires_at,
                  Result.moved_to, Result.received_at).where(  # fmt: skip
        Result.path == path, Result.size_bytes == size, Result.mtime_ns == mtime, Result.moved_at.is_(None))
    return s.execute(stmt.with_for_update(skip_locked=True)).first()


def take_over(s: Session, row_id: int, token: int, worker: str, expires: float) -> bool:
    """Make ``worker`` the row's holder with a new fencing token, if nobody changed it since ``token`` was read."""
    res = s.execute(update(Result).where(Result.id == row_id, Result.lease_token == token).values(
        lease_holder=worker, lease_token=token + 1, lease_expires_at=expires))  # fmt: skip
    return res.rowcount == 1


def still_held(s: Session, tokens: dict[int, int], worker: str) -> set[int]:
    """Of these rows (id -> the token the worker claimed them with), those it still holds, locked for the
    rest of the transaction: a worker presumed dead and back writes nothing to a row taken from it."""
    if not tokens:
        return set()
    rows = s.execute(select(Result.id, Result.lease_token).where(Result.id.in_(list(tokens)), Result.lease_holder == worker)
                     .order_by(Result.id).with_for_update()).all()  # one lock order for every transaction: no deadlock
    return {r.id for r in rows if r.lease_token == tokens[r.id]}


def renew_leases(s: Session, worker: str, expires: float) -> int:
    """Extend every lease ``worker`` holds: claims, and committed rows whose file it has not moved yet.
    Rows locked right now (this worker committing them, another taking them over) wait for the next
    renewal rather than the lock: a renewal never takes part in a deadlock."""
    pending = (Result.status == CLAIMED) | (Result.moved_to.is_not(None))
    ids = select(Result.id).where(Result.lease_holder == worker, Result.moved_at.is_(None), pending)
    ids = ids.with_for_update(skip_locked=True)  # SQLite renders no FOR UPDATE: its write lock covers it
    res = s.execute(update(Result).where(Result.id.in_(ids.scalar_subquery())).values(lease_expires_at=expires))
    return res.rowcount
