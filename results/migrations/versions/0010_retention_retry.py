"""Retention and retries: ``results.pruned_at`` (when retention deleted the row's film or heatmap: the row
keeps its result, ``moved_to``/``heatmap_path`` are emptied); ``results.retry_path`` (where ``xr-results
retry`` put the film back in the inbox) and ``results.retried_as`` (the row the daemon gave it there).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMN, never a batch copy: SQLite cannot drop a table the reviews and outbox refer to
    op.add_column("results", sa.Column("pruned_at", sa.DateTime))
    op.add_column("results", sa.Column("retry_path", sa.Text))
    op.add_column("results", sa.Column("retried_as", sa.Integer))
    op.create_index("ix_results_retry_path", "results", ["retry_path"])


def downgrade() -> None:
    op.drop_index("ix_results_retry_path", "results")
    for col in ("retried_as", "retry_path", "pruned_at"):
        op.execute(f"ALTER TABLE results DROP COLUMN {col}")  # SQLite 3.35+ and PostgreSQL alike
