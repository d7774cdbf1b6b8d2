"""The signed update protocol: update records, their event log, key groups, serving pins.

Revision ID: 0003_updates
Revises: 0002_access
Create Date: 2025-01-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_updates"
down_revision = "0002_access"
branch_labels = None
depends_on = None


def _when(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "updates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("update_id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("parent_version", sa.Integer(), nullable=False),
        sa.Column("target_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=24), nullable=False),
        sa.Column("manifest_digest", sa.String(length=64), nullable=False),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.Column("approvals", sa.JSON(), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("round_id", sa.String(length=32), nullable=True),
        _when("created_at"),
        _when("updated_at"),
        sa.CheckConstraint("kind IN ('package', 'candidate', 'contribution')", name=op.f("ck_updates_kind")),
        sa.CheckConstraint(
            "state IN ('pending', 'aggregated', 'absorbed', 'awaiting-approval', 'stable', 'rejected')",
            name=op.f("ck_updates_state"),
        ),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_updates_node_id_nodes")),
        sa.ForeignKeyConstraint(["target_id"], ["nodes.id"], name=op.f("fk_updates_target_id_nodes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_updates")),
        sa.UniqueConstraint("update_id", name=op.f("uq_updates_update_id")),
    )
    op.create_index(op.f("ix_updates_target_id_state"), "updates", ["target_id", "state"], unique=False)
    op.create_index(op.f("ix_updates_node_id"), "updates", ["node_id"], unique=False)
    op.create_table(
        "update_events",
        sa.Column("id", sa.Integer(), nullable=False),
        _when("at"),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=True),
        sa.Column("update_id", sa.String(length=32), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_update_events_node_id_nodes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_update_events")),
    )
    op.create_index(op.f("ix_update_events_node_id"), "update_events", ["node_id"], unique=False)
    op.create_index(op.f("ix_update_events_update_id"), "update_events", ["update_id"], unique=False)
    op.create_table(
        "key_groups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("scope", sa.String(length=300), nullable=False),
        sa.Column("threshold", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        _when("updated_at"),
        sa.CheckConstraint("role IN ('node', 'evaluator', 'operator', 'root')", name=op.f("ck_key_groups_role")),
        sa.CheckConstraint("threshold >= 1", name=op.f("ck_key_groups_threshold_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_key_groups")),
        sa.UniqueConstraint("role", "scope", name=op.f("uq_key_groups_role_scope")),
    )
    op.create_table(
        "serving_pins",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("chain", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        _when("created_at"),
        sa.CheckConstraint("status IN ('pinned', 'held')", name=op.f("ck_serving_pins_status")),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_serving_pins_node_id_nodes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_serving_pins")),
    )
    op.create_index(op.f("ix_serving_pins_node_id"), "serving_pins", ["node_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_serving_pins_node_id"), table_name="serving_pins")
    op.drop_table("serving_pins")
    op.drop_table("key_groups")
    op.drop_index(op.f("ix_update_events_update_id"), table_name="update_events")
    op.drop_index(op.f("ix_update_events_node_id"), table_name="update_events")
    op.drop_table("update_events")
    op.drop_index(op.f("ix_updates_node_id"), table_name="updates")
    op.drop_index(op.f("ix_updates_target_id_state"), table_name="updates")
    op.drop_table("updates")
