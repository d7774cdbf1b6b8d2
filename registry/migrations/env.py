"""Alembic environment for the registry: run migrations on the connection the caller passes.

There is no alembic.ini: :mod:`registry.db` builds the Config in code and hands
over an open connection in ``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context

from registry.models import Model

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reachable by running alembic by hand
    raise RuntimeError("run registry migrations through `treelm registry init|upgrade`")

context.configure(
    connection=connection,
    target_metadata=Model.metadata,
    # SQLite cannot ALTER most things; batch mode copies the table instead.
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
