"""Access and operations: API tokens, signing keys, deployments.

Revision ID: 0002_access
Revises: 0001_core
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_access"
down_revision = "0001_core"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("salt", sa.String(length=64), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_api_tokens_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_id", name=op.f("uq_api_tokens_token_id")),
    )
    op.create_table(
        "signing_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("algorithm", sa.String(length=16), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("role IN ('node', 'evaluator', 'operator', 'root')", name=op.f("ck_signing_keys_role")),
        sa.CheckConstraint("status IN ('active', 'revoked')", name=op.f("ck_signing_keys_status")),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_signing_keys_node_id_nodes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_signing_keys")),
        sa.UniqueConstraint("key_id", name=op.f("uq_signing_keys_key_id")),
    )
    op.create_index(op.f("ix_signing_keys_node_id"), "signing_keys", ["node_id"], unique=False)
    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("trunk", sa.String(length=200), nullable=False),
        sa.Column("endpoint", sa.String(length=300), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('active', 'draining', 'stopped')", name=op.f("ck_deployments_status")),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_deployments_node_id_nodes")),
        sa.ForeignKeyConstraint(
            ["version_id"], ["node_versions.id"], name=op.f("fk_deployments_version_id_node_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployments")),
        sa.UniqueConstraint("node_id", "endpoint", name=op.f("uq_deployments_node_id_endpoint")),
    )


def downgrade() -> None:
    op.drop_table("deployments")
    op.drop_index(op.f("ix_signing_keys_node_id"), table_name="signing_keys")
    op.drop_table("signing_keys")
    op.drop_table("api_tokens")
