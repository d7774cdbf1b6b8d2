"""Fine-tuning jobs: uploaded training files, jobs and their events; retired nodes; update records
of kind ``create`` (a node made by a job, version 1 signed by the service's key).

Revision ID: 0008_fine_tuning
Revises: 0007_forgetting
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_fine_tuning"
down_revision = "0007_forgetting"
branch_labels = None
depends_on = None

OLD_KINDS = ("package", "candidate", "contribution", "rebase")
NEW_KINDS = ("package", "candidate", "contribution", "rebase", "create")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def _kinds(values: tuple[str, ...]) -> None:
    # SQLite cannot alter a CHECK constraint: batch mode copies the table with the new one.
    with op.batch_alter_table("updates", recreate="auto") as batch:
        batch.drop_constraint(op.f("ck_updates_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_updates_kind"), f"kind IN ({', '.join(repr(v) for v in values)})")


def upgrade() -> None:
    _kinds(NEW_KINDS)
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "training_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("file_id", sa.String(length=40), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("filename", sa.String(length=256), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("format", sa.String(length=8), nullable=False),
        sa.Column("records", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_files")),
        sa.UniqueConstraint("file_id", name=op.f("uq_training_files_file_id")),
    )
    op.create_index(op.f("ix_training_files_tenant"), "training_files", ["tenant"])
    op.create_table(
        "fine_tuning_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("tree", sa.String(length=64), nullable=False),
        sa.Column("parent", sa.String(length=300), nullable=False),
        sa.Column("node", sa.String(length=300), nullable=False),
        sa.Column("visibility", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("training_file", sa.String(length=40), nullable=False),
        sa.Column("validation_file", sa.String(length=40), nullable=True),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("worker", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            f"status IN ({', '.join(repr(v) for v in JOB_STATUSES)})", name=op.f("ck_fine_tuning_jobs_status")
        ),
        sa.CheckConstraint("visibility IN ('public', 'private')", name=op.f("ck_fine_tuning_jobs_visibility")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fine_tuning_jobs")),
        sa.UniqueConstraint("job_id", name=op.f("uq_fine_tuning_jobs_job_id")),
    )
    op.create_index(op.f("ix_fine_tuning_jobs_tenant"), "fine_tuning_jobs", ["tenant"])
    op.create_index(op.f("ix_fine_tuning_jobs_status_tree"), "fine_tuning_jobs", ["status", "tree"])
    op.create_table(
        "fine_tuning_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_pk", sa.Integer(), nullable=False),
        sa.Column("level", sa.String(length=8), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_pk"], ["fine_tuning_jobs.id"], name=op.f("fk_fine_tuning_events_job_pk_fine_tuning_jobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fine_tuning_events")),
    )
    op.create_index(op.f("ix_fine_tuning_events_job_pk"), "fine_tuning_events", ["job_pk"])


def downgrade() -> None:
    op.drop_index(op.f("ix_fine_tuning_events_job_pk"), table_name="fine_tuning_events")
    op.drop_table("fine_tuning_events")
    op.drop_index(op.f("ix_fine_tuning_jobs_status_tree"), table_name="fine_tuning_jobs")
    op.drop_index(op.f("ix_fine_tuning_jobs_tenant"), table_name="fine_tuning_jobs")
    op.drop_table("fine_tuning_jobs")
    op.drop_index(op.f("ix_training_files_tenant"), table_name="training_files")
    op.drop_table("training_files")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("retired_at")
    op.execute("DELETE FROM update_events WHERE update_id IN (SELECT update_id FROM updates WHERE kind = 'create')")
    op.execute("DELETE FROM updates WHERE kind = 'create'")
    _kinds(OLD_KINDS)
