"""Several workers on one database: who scored a row, leases on claims, one claim per inbox file.

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":  # nanosecond mtimes need 64 bits (SQLite's INTEGER has them)
        for column in ("size_bytes", "mtime_ns"):
            op.alter_column("results", column, type_=sa.BigInteger, existing_type=sa.Integer, existing_nullable=False)
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("worker_id", sa.String(128)))  # the worker that scored the row
        batch.add_column(sa.Column("lease_holder", sa.String(128)))  # the worker that holds it until it is moved
        batch.add_column(sa.Column("lease_token", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("lease_expires_at", sa.Float))  # the database's clock, epoch seconds
    # One row at a time owns an inbox file: the atomic insert of a claim is what decides between workers.
    op.create_index("ux_results_inbox_identity", "results", ["path", "size_bytes", "mtime_ns"], unique=True,
                    sqlite_where=sa.text("moved_at IS NULL"), postgresql_where=sa.text("moved_at IS NULL"))


def downgrade() -> None:
    op.drop_index("ux_results_inbox_identity", "results")
    with op.batch_alter_table("results") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_token")
        batch.drop_column("lease_holder")
        batch.drop_column("worker_id")
