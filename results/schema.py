"""The results database's schema: SQLAlchemy 2.0 models, the status enum and the columns exports show.

The database is the journal every program shares (docs/design.md): xr-daemon writes it, xr-results,
xr-review and xr-score read it or add to it through this package, and its schema changes only through
the migrations in results/migrations.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
import re
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from xr.core.dicom import IDENTIFIERS

SCHEMA_VERSION = 10  # the head revision of results/migrations (0010)


class Status(str, enum.Enum):
    """A row's state: ``claimed`` while its file is worked on, then one of the final four."""

    CLAIMED = "claimed"
    OK = "ok"
    ERROR = "error"
    DUPLICATE = "duplicate"
    SKIPPED = "skipped"

    def __str__(self) -> str:  # the value, as enum.StrEnum (Python 3.11+) gives it, in text and CSVs
        return self.value

    __format__ = str.__format__


FINAL_STATUSES = (Status.OK, Status.ERROR, Status.DUPLICATE, Status.SKIPPED)
SCORED = (Status.OK, Status.DUPLICATE)  # rows with a score: a duplicate carries its first result's
STATUSES = tuple(Status)


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
    probability: Mapped[float | None] = mapped_column(Float)  # calibrated: sigmoid(logit / T + shift)
    threshold: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str | None] = mapped_column(String(32))
    flagged: Mapped[bool | None] = mapped_column(Boolean, index=True)
    # an unflagged film drawn at scoring (review.audit_rate) for a blinded review: what the flag misses
    audit: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"), index=True)
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
    manufacturer: Mapped[str | None] = mapped_column(String(64))  # the scanner: performance by scanner
    station_name: Mapped[str | None] = mapped_column(String(64))
    heatmap_path: Mapped[str | None] = mapped_column(Text)  # <output>/heatmaps/<id>.png: where the model looked
    # several workers on one database (docs/operations.md, "Several hosts"): the worker that scored the row;
    # the one that holds it until its file is moved, the lease's fencing token and when it runs out (the
    # database's clock, epoch seconds)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    lease_holder: Mapped[str | None] = mapped_column(String(128))
    lease_token: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    # runs that died while this claimed file was being parsed or decoded; at 2 it is set aside (journal.py)
    read_crashes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # retention (results/retention.py) deleted this row's film and/or heatmap then; the result stays
    pruned_at: Mapped[dt.datetime | None]
    # xr-results retry (results/retry.py): where the film went back into the inbox, and the row it got there
    retry_path: Mapped[str | None] = mapped_column(Text, index=True)
    retried_as: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        Index("ix_results_identity", "path", "size_bytes", "mtime_ns"),
        Index(
            "ux_results_inbox_identity",
            "path",
            "size_bytes",
            "mtime_ns",
            unique=True,
            sqlite_where=text("moved_at IS NULL"),
            postgresql_where=text("moved_at IS NULL"),
        ),
    )

    def as_dict(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in EXPORT_COLUMNS}


DICOM_COLUMNS = tuple(IDENTIFIERS)
EXPORT_COLUMNS = (
    "id",
    "path",
    "filename",
    "sha256",
    "size_bytes",
    "status",
    "error",
    "duplicate_of",
    "logit",
    "probability",
    "threshold",
    "label",
    "flagged",
    "audit",
    "model_id",
    "temperature",
    "calibration_id",
    "batch_id",
    "received_at",
    "processed_at",
    "latency_ms",
    "moved_to",
    "worker_id",
    *DICOM_COLUMNS,
)


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


DECISIONS = ("pneumonia", "normal")  # what the reader saw on the film, flagged and audit cases alike


class Review(Base):
    """A reader's decision on a flagged or audit case (xr-review); a case with one has left the queue."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    decision: Mapped[str] = mapped_column(String(16))  # pneumonia | normal (DECISIONS)
    note: Mapped[str | None] = mapped_column(Text)
    reviewer: Mapped[str | None] = mapped_column(String(128))
    reviewed_at: Mapped[dt.datetime]


REVIEW_COLUMNS = ("id", "result_id", "decision", "note", "reviewer", "reviewed_at")

ROLES = ("reader", "auditor", "admin")  # readers decide; auditors look and read the trail; admins manage users


class User(Base):
    """An xr-review account (review/users.py): its role, and its password as an Argon2id hash."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # one of ROLES
    password_hash: Mapped[str | None] = mapped_column(Text)  # None: signs in only through a trusted proxy
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime]
    password_changed_at: Mapped[dt.datetime | None]


class AuditEvent(Base):
    """One row of the audit trail: who did what to which case, from where, and how it ended.

    Append-only: results/audit.py only inserts, and triggers from migration 0006 refuse UPDATE and DELETE.
    """

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(index=True)  # UTC
    username: Mapped[str | None] = mapped_column(String(128), index=True)
    action: Mapped[str] = mapped_column(String(32), index=True)  # login, view_case, review, ... (results/audit.py)
    outcome: Mapped[str] = mapped_column(String(16))  # ok | denied | failed
    result_id: Mapped[int | None] = mapped_column(Integer, index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)


AUDIT_COLUMNS = (
    "id",
    "at",
    "username",
    "action",
    "outcome",
    "result_id",
    "accession_number",
    "patient_id",
    "study_instance_uid",
    "remote_addr",
    "detail",
)


OUTBOX_KINDS = ("sr", "sc")  # a Structured Report for every scored DICOM film; a Secondary Capture for flagged ones
OUTBOX_STATUSES = ("pending", "sent", "failed")


class OutboxItem(Base):
    """One DICOM object for one destination (results/outbox.py): committed before it is sent, so neither a
    crash nor a PACS that is down loses it; its SOP Instance UID is derived from the result, so a re-send is
    the same instance to the PACS."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"))
    kind: Mapped[str] = mapped_column(String(8))  # one of OUTBOX_KINDS
    destination: Mapped[str] = mapped_column(String(200))  # AET@HOST:PORT
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[bytes | None] = mapped_column(LargeBinary)  # the encoded object; cleared once sent
    status: Mapped[str] = mapped_column(String(16))  # one of OUTBOX_STATUSES
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[float] = mapped_column(Float)  # the database's clock, epoch seconds
    give_up_at: Mapped[float] = mapped_column(Float)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime]
    sent_at: Mapped[dt.datetime | None]

    __table_args__ = (
        UniqueConstraint("destination", "sop_instance_uid", name="ux_outbox_destination_uid"),
        Index("ix_outbox_result", "result_id"),
        Index("ix_outbox_due", "status", "next_attempt_at"),
    )


OUTBOX_COLUMNS = (
    "id",
    "result_id",
    "kind",
    "destination",
    "status",
    "attempts",
    "last_error",
    "created_at",
    "sent_at",
    "sop_instance_uid",
    "study_instance_uid",
)


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
