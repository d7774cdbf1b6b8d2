"""Token roles (tenant, operator) and optional expiry.

Revision ID: 0005_token_roles
Revises: 0004_variant_kinds
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_token_roles"
down_revision = "0004_variant_kinds"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite cannot add a CHECK constraint to a table in place: batch mode copies the table.
    with op.batch_alter_table("api_tokens", recreate="auto") as batch:
        batch.add_column(sa.Column("role", sa.String(length=16), nullable=False, server_default="tenant"))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_check_constraint(op.f("ck_api_tokens_role"), "role IN ('tenant', 'operator')")


def downgrade() -> None:
    with op.batch_alter_table("api_tokens", recreate="auto") as batch:
        batch.drop_constraint(op.f("ck_api_tokens_role"), type_="check")
        batch.drop_column("expires_at")
        batch.drop_column("role")
