"""Forgetting history: every protocol-made version's perplexity on its own, its parent's and its
siblings' eval texts; and update records of kind ``rebase`` (a child re-fit over its parent's new version).

Revision ID: 0007_forgetting
Revises: 0006_feedback
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_forgetting"
down_revision = "0006_feedback"
branch_labels = None
depends_on = None

OLD_KINDS = ("package", "candidate", "contribution")
NEW_KINDS = ("package", "candidate", "contribution", "rebase")


def _kinds(values: tuple[str, ...]) -> None:
    # SQLite cannot alter a CHECK constraint: batch mode copies the table with the new one.
    with op.batch_alter_table("updates", recreate="auto") as batch:
        batch.drop_constraint(op.f("ck_updates_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_updates_kind"), f"kind IN ({', '.join(repr(v) for v in values)})")


def upgrade() -> None:
    _kinds(NEW_KINDS)
    op.create_table(
        "version_perplexities",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("text_node_id", sa.Integer(), nullable=False),
        sa.Column("perplexity", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("role IN ('own', 'parent', 'sibling', 'stale')", name=op.f("ck_version_perplexities_role")),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_version_perplexities_node_id_nodes")),
        sa.ForeignKeyConstraint(
            ["text_node_id"], ["nodes.id"], name=op.f("fk_version_perplexities_text_node_id_nodes")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_version_perplexities")),
    )
    op.create_index(op.f("ix_version_perplexities_node_id_version"), "version_perplexities", ["node_id", "version"])


def downgrade() -> None:
    op.drop_index(op.f("ix_version_perplexities_node_id_version"), table_name="version_perplexities")
    op.drop_table("version_perplexities")
    op.execute("DELETE FROM update_events WHERE update_id IN (SELECT update_id FROM updates WHERE kind = 'rebase')")
    op.execute("DELETE FROM updates WHERE kind = 'rebase'")
    _kinds(OLD_KINDS)
