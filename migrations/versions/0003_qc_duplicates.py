"""QC sweeps keep their near-duplicate pairs, so a server can show the latest sweep without re-running it

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qc_duplicates",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("qc_runs.id"), nullable=False),
        sa.Column("image_a_id", sa.Integer(), sa.ForeignKey("images.id"), nullable=False),
        sa.Column("image_b_id", sa.Integer(), sa.ForeignKey("images.id"), nullable=False),
        sa.Column("similarity", sa.Float(), nullable=False),
        sa.Column("pixel_correlation", sa.Float(), nullable=True),
        sa.UniqueConstraint("run_id", "image_a_id", "image_b_id", name="uq_qc_duplicates_run_pair"),
    )
    op.create_index("ix_qc_duplicates_run_id", "qc_duplicates", ["run_id"])


def downgrade() -> None:
    op.drop_table("qc_duplicates")
