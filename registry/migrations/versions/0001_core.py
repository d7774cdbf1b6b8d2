"""Core catalogue: tenants, base models, nodes and tags, versions, aliases, variants.

Revision ID: 0001_core
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_core"
down_revision = None
branch_labels = None
depends_on = None


def _created(name: str = "created_at") -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        _created(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )
    op.create_table(
        "base_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("architecture", sa.String(length=100), nullable=False),
        sa.Column("weight_dtype", sa.String(length=16), nullable=False),
        sa.Column("parameter_count", sa.BigInteger(), nullable=False),
        sa.Column("quantizable_parameter_count", sa.BigInteger(), nullable=False),
        sa.Column("weights_bytes", sa.BigInteger(), nullable=False),
        sa.Column("layers", sa.Integer(), nullable=False),
        sa.Column("hidden_size", sa.Integer(), nullable=False),
        sa.Column("attention_heads", sa.Integer(), nullable=False),
        sa.Column("kv_heads", sa.Integer(), nullable=False),
        sa.Column("head_dim", sa.Integer(), nullable=False),
        sa.Column("intermediate_size", sa.Integer(), nullable=True),
        sa.Column("vocab_size", sa.Integer(), nullable=False),
        sa.Column("max_context", sa.Integer(), nullable=False),
        _created(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_base_models")),
        sa.UniqueConstraint("digest", name=op.f("uq_base_models_digest")),
    )
    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=300), nullable=False),
        sa.Column("tree", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=250), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("base_model_id", sa.Integer(), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("language", sa.String(length=64), nullable=True),
        sa.Column("domain", sa.String(length=64), nullable=True),
        sa.Column("subdomain", sa.String(length=64), nullable=True),
        sa.Column("visibility", sa.String(length=16), nullable=False),
        sa.Column("owner_tenant_id", sa.Integer(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        _created(),
        sa.CheckConstraint("level IN ('base', 'language', 'domain', 'subdomain')", name=op.f("ck_nodes_level")),
        sa.CheckConstraint(
            "visibility = 'public' OR owner_tenant_id IS NOT NULL", name=op.f("ck_nodes_private_has_owner")
        ),
        sa.CheckConstraint("visibility IN ('public', 'private')", name=op.f("ck_nodes_visibility")),
        sa.ForeignKeyConstraint(["base_model_id"], ["base_models.id"], name=op.f("fk_nodes_base_model_id_base_models")),
        sa.ForeignKeyConstraint(["owner_tenant_id"], ["tenants.id"], name=op.f("fk_nodes_owner_tenant_id_tenants")),
        sa.ForeignKeyConstraint(["parent_id"], ["nodes.id"], name=op.f("fk_nodes_parent_id_nodes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nodes")),
        sa.UniqueConstraint("node_id", name=op.f("uq_nodes_node_id")),
        sa.UniqueConstraint("tree", "path", name=op.f("uq_nodes_tree_path")),
    )
    # Matching seeks on these: a path lineage, or a task's attributes (see registry.candidates).
    op.create_index(op.f("ix_nodes_domain_subdomain"), "nodes", ["domain", "subdomain"], unique=False)
    op.create_index(
        op.f("ix_nodes_language_domain_subdomain"), "nodes", ["language", "domain", "subdomain"], unique=False
    )
    op.create_index(op.f("ix_nodes_parent_id"), "nodes", ["parent_id"], unique=False)
    op.create_index(op.f("ix_nodes_path"), "nodes", ["path"], unique=False)
    op.create_index(op.f("ix_nodes_subdomain"), "nodes", ["subdomain"], unique=False)
    op.create_table(
        "node_tags",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("tag", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_node_tags_node_id_nodes")),
        sa.PrimaryKeyConstraint("node_id", "tag", name=op.f("pk_node_tags")),
    )
    op.create_index(op.f("ix_node_tags_tag"), "node_tags", ["tag"], unique=False)
    op.create_table(
        "node_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        sa.Column("manifest_digest", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _created(),
        _created("status_changed_at"),
        sa.CheckConstraint(
            "status IN ('candidate', 'accepted', 'rejected', 'revoked')", name=op.f("ck_node_versions_status")
        ),
        sa.CheckConstraint("version >= 1", name=op.f("ck_node_versions_version_positive")),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_node_versions_node_id_nodes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_versions")),
        sa.UniqueConstraint("node_id", "version", name=op.f("uq_node_versions_node_id_version")),
    )
    op.create_table(
        "aliases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=16), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("name IN ('stable', 'candidate')", name=op.f("ck_aliases_name")),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=op.f("fk_aliases_node_id_nodes")),
        sa.ForeignKeyConstraint(["version_id"], ["node_versions.id"], name=op.f("fk_aliases_version_id_node_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_aliases")),
        sa.UniqueConstraint("node_id", "name", name=op.f("uq_aliases_node_id_name")),
    )
    op.create_table(
        "variants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("bytes_estimated", sa.Boolean(), nullable=False),
        sa.Column("adapter_parameters", sa.BigInteger(), nullable=False),
        sa.Column("tokens_per_second", sa.Float(), nullable=True),
        sa.Column("measured_device", sa.String(length=8), nullable=True),
        sa.Column("uri", sa.Text(), nullable=True),
        _created(),
        sa.CheckConstraint("kind IN ('chain', 'flat', 'merged', 'merged-int8')", name=op.f("ck_variants_kind")),
        sa.CheckConstraint("bytes >= 0 AND adapter_parameters >= 0", name=op.f("ck_variants_sizes")),
        sa.ForeignKeyConstraint(
            ["version_id"], ["node_versions.id"], name=op.f("fk_variants_version_id_node_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_variants")),
        sa.UniqueConstraint("version_id", "kind", name=op.f("uq_variants_version_id_kind")),
    )


def downgrade() -> None:
    op.drop_table("variants")
    op.drop_table("aliases")
    op.drop_table("node_versions")
    op.drop_index(op.f("ix_node_tags_tag"), table_name="node_tags")
    op.drop_table("node_tags")
    for index in ("subdomain", "path", "parent_id", "language_domain_subdomain", "domain_subdomain"):
        op.drop_index(op.f(f"ix_nodes_{index}"), table_name="nodes")
    op.drop_table("nodes")
    op.drop_table("base_models")
    op.drop_table("tenants")
