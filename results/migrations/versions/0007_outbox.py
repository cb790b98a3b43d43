"""The DICOM outbox: SR and SC objects waiting for, or done with, their C-STORE to a PACS.

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("result_id", sa.Integer, sa.ForeignKey("results.id"), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),  # sr | sc
        sa.Column("destination", sa.String(200), nullable=False),  # AET@HOST:PORT
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),  # derived from the result: stable
        sa.Column("study_instance_uid", sa.String(64)),
        sa.Column("data", sa.LargeBinary),  # the encoded object; cleared once the PACS has it
        sa.Column("status", sa.String(16), nullable=False),  # pending | sent | failed
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Float, nullable=False),  # the database's clock, epoch seconds
        sa.Column("give_up_at", sa.Float, nullable=False),
        sa.Column("claimed_by", sa.String(128)),  # the worker sending it now (or last)
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("sent_at", sa.DateTime),
        sa.UniqueConstraint("destination", "sop_instance_uid", name="ux_outbox_destination_uid"),
    )
    op.create_index("ix_outbox_result", "outbox", ["result_id"])
    op.create_index("ix_outbox_due", "outbox", ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_outbox_due", "outbox")
    op.drop_index("ix_outbox_result", "outbox")
    op.drop_table("outbox")
