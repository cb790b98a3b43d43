"""DICOM identifiers with each result; the status ``skipped`` needs no schema change.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = ("patient_id", "accession_number", "study_instance_uid", "series_instance_uid", "sop_instance_uid",
           "modality", "body_part", "view_position", "study_date")
INDEXED = ("patient_id", "accession_number", "sop_instance_uid")


def upgrade() -> None:
    with op.batch_alter_table("results") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.String(64) if name not in ("study_date",) else sa.String(16)))
        for name in INDEXED:
            batch.create_index(f"ix_results_{name}", [name])


def downgrade() -> None:
    with op.batch_alter_table("results") as batch:
        for name in INDEXED:
            batch.drop_index(f"ix_results_{name}")
        for name in COLUMNS:
            batch.drop_column(name)
