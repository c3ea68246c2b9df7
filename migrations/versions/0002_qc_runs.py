"""QC sweeps: runs and per-image outlier scores

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qc_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model_version_id", sa.Integer(), sa.ForeignKey("model_versions.id"), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("params_json", sa.Text(), nullable=False),
        sa.Column("n_images", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_qc_runs_model_version_id", "qc_runs", ["model_version_id"])
    op.create_table(
        "qc_scores",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("qc_runs.id"), nullable=False),
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id"), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("flags", sa.Text(), nullable=True),
        sa.UniqueConstraint("run_id", "image_id", name="uq_qc_scores_run_image"),
    )
    op.create_index("ix_qc_scores_run_id", "qc_scores", ["run_id"])
    op.create_index("ix_qc_scores_image_id", "qc_scores", ["image_id"])


def downgrade() -> None:
    op.drop_table("qc_scores")
    op.drop_table("qc_runs")
