"""Variant kinds for devices: half-precision merged models, GGUF files and LoRA GGUF chains.

Revision ID: 0004_variant_kinds
Revises: 0003_updates
Create Date: 2025-01-04
"""

from __future__ import annotations

from alembic import op

revision = "0004_variant_kinds"
down_revision = "0003_updates"
branch_labels = None
depends_on = None

OLD = ("chain", "flat", "merged", "merged-int8")
NEW = ("chain", "flat", "merged", "merged-fp16", "merged-bf16", "merged-int8", "gguf-f16", "gguf-q4_0", "gguf-lora")


def _kinds(values: tuple[str, ...]) -> str:
    return f"kind IN ({', '.join(repr(v) for v in values)})"


def _replace(values: tuple[str, ...]) -> None:
    # SQLite cannot alter a CHECK constraint: batch mode copies the table with the new one.
    with op.batch_alter_table("variants", recreate="auto") as batch:
        batch.drop_constraint(op.f("ck_variants_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_variants_kind"), _kinds(values))


def upgrade() -> None:
    _replace(NEW)


def downgrade() -> None:
    op.execute(f"DELETE FROM variants WHERE NOT ({_kinds(OLD)})")
    _replace(OLD)
