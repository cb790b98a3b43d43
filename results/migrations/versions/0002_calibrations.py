"""Which calibration scored each row: results.calibration_id and the calibrations table.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "calibrations",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("model_id", sa.Text, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("path", sa.Text),
        sa.Column("temperature", sa.Float, nullable=False),
        sa.Column("shift", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("reference", sa.Text),
        sa.Column("first_used_at", sa.DateTime, nullable=False),
    )
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("calibration_id", sa.String(64)))
        batch.create_index("ix_results_calibration_id", ["calibration_id"])


def downgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.drop_index("ix_results_calibration_id")
        batch.drop_column("calibration_id")
    op.drop_table("calibrations")
