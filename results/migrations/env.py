"""Alembic environment: migrations run on the connection that ``xr.results.engine.init_schema`` passes in, on
SQLite and PostgreSQL alike (``render_as_batch`` lets SQLite change tables it cannot ALTER)."""

from alembic import context

from xr.results.schema import Base

context.configure(
    connection=context.config.attributes["connection"], target_metadata=Base.metadata, render_as_batch=True
)
with context.begin_transaction():
    context.run_migrations()
