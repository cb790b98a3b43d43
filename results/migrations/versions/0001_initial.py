"""The first schema: results, batches, meta.

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("n_ok", sa.Integer, nullable=False),
        sa.Column("n_error", sa.Integer, nullable=False),
        sa.Column("n_duplicate", sa.Integer, nullable=False),
        sa.Column("wait_ms", sa.Float, nullable=False),
        sa.Column("model_ms", sa.Float, nullable=False),
        sa.Column("model_id", sa.Text),
    )
    op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "results",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("filename", sa.Text, nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("mtime_ns", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("duplicate_of", sa.Integer, sa.ForeignKey("results.id")),
        sa.Column("logit", sa.Float),
        sa.Column("probability", sa.Float),
        sa.Column("threshold", sa.Float),
        sa.Column("label", sa.String(32)),
        sa.Column("flagged", sa.Boolean),
        sa.Column("model_id", sa.Text),
        sa.Column("temperature", sa.Float),
        sa.Column("batch_id", sa.Integer, sa.ForeignKey("batches.id")),
        sa.Column("received_at", sa.DateTime, nullable=False),
        sa.Column("claimed_at", sa.DateTime, nullable=False),
        sa.Column("processed_at", sa.DateTime),
        sa.Column("latency_ms", sa.Float),
        sa.Column("moved_to", sa.Text),
        sa.Column("moved_at", sa.DateTime),
    )
    for name, cols in (("processed_at", ["processed_at"]), ("flagged", ["flagged"]), ("sha256", ["sha256"]),
                       ("received_at", ["received_at"]), ("status", ["status"])):
        op.create_index(f"ix_results_{name}", "results", cols)
    op.create_index("ix_results_identity", "results", ["path", "size_bytes", "mtime_ns"])


def downgrade() -> None:
    op.drop_table("results")
    op.drop_table("meta")
    op.drop_table("batches")
