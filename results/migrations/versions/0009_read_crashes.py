"""Files that stopped the daemon: ``results.read_crashes`` counts the runs that died while reading a claimed
file (its parse or decode in flight), so a file that kills the process is set aside at its second crash
instead of looping under a service manager.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("results", sa.Column("read_crashes", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    op.execute("ALTER TABLE results DROP COLUMN read_crashes")  # SQLite 3.35+ and PostgreSQL alike
