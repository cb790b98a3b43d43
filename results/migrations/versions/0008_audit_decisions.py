"""Audit sampling, the scanner of each film, and one decision vocabulary.

``results.audit``: an unflagged film drawn for a blinded review (issue 34); ``results.manufacturer`` and
``results.station_name``: the DICOM scanner, for performance and flag rates by scanner. Reviews say what
the reader saw: old ``confirm`` rows become ``pneumonia``, ``dismiss`` rows ``normal``.

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

RENAMED = {"confirm": "pneumonia", "dismiss": "normal"}


def upgrade() -> None:
    # plain ADD/DROP COLUMN, never a batch copy: SQLite cannot drop a table the reviews and outbox refer to
    op.add_column("results", sa.Column("audit", sa.Boolean, nullable=False, server_default=sa.false()))
    op.add_column("results", sa.Column("manufacturer", sa.String(64)))
    op.add_column("results", sa.Column("station_name", sa.String(64)))
    op.create_index("ix_results_audit", "results", ["audit"])
    reviews = sa.table("reviews", sa.column("decision", sa.String))
    for old, new in RENAMED.items():
        op.execute(reviews.update().where(reviews.c.decision == old).values(decision=new))


def downgrade() -> None:
    reviews = sa.table("reviews", sa.column("decision", sa.String))
    for old, new in RENAMED.items():
        op.execute(reviews.update().where(reviews.c.decision == new).values(decision=old))
    op.drop_index("ix_results_audit", "results")
    for name in ("station_name", "manufacturer", "audit"):
        op.execute(f"ALTER TABLE results DROP COLUMN {name}")  # SQLite 3.35+ and PostgreSQL alike
