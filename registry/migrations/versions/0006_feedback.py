"""Feedback on responses, per-tenant retention, and the update-timing policy's decision log.

Revision ID: 0006_feedback
Revises: 0005_token_roles
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_feedback"
down_revision = "0005_token_roles"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("response_id", sa.String(length=128), nullable=False),
        sa.Column("node", sa.String(length=300), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("answer", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_responses")),
        sa.UniqueConstraint("tenant", "response_id", name=op.f("uq_responses_tenant_response_id")),
    )
    op.create_index(op.f("ix_responses_node_tenant"), "responses", ["node", "tenant"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("response_pk", sa.Integer(), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("node", sa.String(length=300), nullable=False),
        sa.Column("rating", sa.Integer(), nullable=False),
        sa.Column("correction", sa.Text(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_by", sa.String(length=64), nullable=True),
        sa.CheckConstraint("rating IN (-1, 1)", name=op.f("ck_feedback_rating")),
        sa.ForeignKeyConstraint(["response_pk"], ["responses.id"], name=op.f("fk_feedback_response_pk_responses")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
    )
    op.create_index(op.f("ix_feedback_node_tenant"), "feedback", ["node", "tenant"])
    op.create_index(op.f("ix_feedback_response_pk"), "feedback", ["response_pk"])
    op.create_table(
        "feedback_retention",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("node", sa.String(length=300), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback_retention")),
        sa.UniqueConstraint("tenant", "node", name=op.f("uq_feedback_retention_tenant_node")),
    )
    op.create_table(
        "policy_decisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("node", sa.String(length=300), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("update_id", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_decisions")),
    )
    op.create_index(op.f("ix_policy_decisions_node"), "policy_decisions", ["node"])


def downgrade() -> None:
    op.drop_index(op.f("ix_policy_decisions_node"), table_name="policy_decisions")
    op.drop_table("policy_decisions")
    op.drop_table("feedback_retention")
    op.drop_index(op.f("ix_feedback_response_pk"), table_name="feedback")
    op.drop_index(op.f("ix_feedback_node_tenant"), table_name="feedback")
    op.drop_table("feedback")
    op.drop_index(op.f("ix_responses_node_tenant"), table_name="responses")
    op.drop_table("responses")
