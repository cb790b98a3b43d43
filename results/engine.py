"""Opening the results database: URLs, engines with SQLite's pragmas, schema creation and upgrade through
the migrations (Alembic), the meta table."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, make_url, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, DatabaseError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from xr.core.errors import XRError
from xr.core.files import apply_mode, file_mode, make_dirs
from xr.results.schema import SCHEMA_VERSION, Meta

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


IDLE_IN_TRANSACTION_MS = 30_000  # the daemon's transactions last milliseconds


def db_url(db: str | Path) -> str:
    """A SQLAlchemy URL as is, a path -> ``sqlite:///<absolute path>``; only SQLite and PostgreSQL."""
    s = str(db)
    if "://" in s:
        if not s.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
            raise XRError(
                f"results database {shown_url(s)!r}: use a SQLite file path or a "
                "postgresql+psycopg://USER@HOST:PORT/DB URL"
            )
        if s.startswith("postgresql://"):  # SQLAlchemy's default driver for it is psycopg2; we ship psycopg 3
            s = "postgresql+psycopg://" + s[len("postgresql://") :]
        return s
    return f"sqlite:///{Path(s).expanduser().resolve()}"


def shown_url(db: str | Path) -> str:
    """``db`` as logs and messages show it: a URL's password as ``***``."""
    s = str(db)
    if "://" not in s:
        return s
    try:
        return make_url(s).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", s)  # not a URL SQLAlchemy reads: hide what looks like one


def private_sqlite(path: Path) -> None:
    """Create a new SQLite database file (and its folder) private (core/files.py) before SQLite opens it:
    SQLite gives the -wal and -shm files the database file's mode, so they are private too."""
    make_dirs(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, file_mode())
    except FileExistsError:
        return  # the operator's file, or one made so before
    try:
        apply_mode(path, fd=fd)
    finally:
        os.close(fd)


def make_engine(db: str | Path, *, create: bool = True, immediate: bool = True) -> Engine:
    """Engine with SQLite pragmas set on every connection; creates the schema when ``create``.

    ``immediate``: every transaction starts with ``BEGIN IMMEDIATE`` (takes the write lock at once and
    waits up to busy_timeout for it), so concurrent writers never fail with a lock upgrade error.
    """
    url = db_url(db)
    try:
        if url.startswith("sqlite:///") and create:
            private_sqlite(sqlite_file(url))
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30})
        else:
            # A server across the network: pooled connections are tested before use, connecting gives up
            # in 10 s, and a session left inside a transaction (its worker frozen or cut off) is ended by
            # the server so that its row locks do not hold the other workers up.
            engine = create_engine(
                url,
                pool_pre_ping=True,
                connect_args={
                    "connect_timeout": 10,
                    "options": f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}",
                },
            )
    except ImportError as exc:
        hint = " (pip install 'xr-triage[postgresql]')" if url.startswith("postgresql") else ""
        raise XRError(
            f"cannot open results database {shown_url(url)}: its driver is not installed{hint}: {exc}"
        ) from None
    except (ArgumentError, OSError) as exc:  # a URL of an unknown or uninstalled driver, a bad folder
        raise XRError(f"cannot open results database {shown_url(url)}: {exc}") from None
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            if create:  # the writer; a reader (xr-results) must not rewrite the file it is asked to read
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    try:
        if create:
            init_schema(engine)
        else:
            check_schema(engine)
    except OperationalError as exc:  # read-only folder, a locked or unreachable server...
        engine.dispose()
        raise XRError(f"cannot open results database {shown_url(url)}: {exc.orig or exc}") from None
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
    path = url[len("sqlite:///") :].split("?", 1)[0]
    return Path(path[len("file:") :] if path.startswith("file:") else path)


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
        raise XRError(
            f"results database schema version {version} is newer than this program (version {SCHEMA_VERSION}); upgrade xr-triage"
        )


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
