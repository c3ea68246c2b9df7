"""initial schema: model versions, studies, images, embeddings, rejected files

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("encoder", sa.String(64), nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("weights_path", sa.Text(), nullable=True),
        sa.Column("random_weights", sa.Boolean(), nullable=False),
        sa.Column("preprocess_digest", sa.String(32), nullable=False),
        sa.Column("preprocess_json", sa.Text(), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("key", name="uq_model_versions_key"),
    )
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_key", sa.String(128), nullable=False),
        sa.Column("key_source", sa.String(16), nullable=False),
        sa.Column("accession_number", sa.String(64), nullable=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("patient_id", sa.String(128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("study_key", name="uq_studies_study_key"),
    )
    op.create_index("ix_studies_accession_number", "studies", ["accession_number"])
    op.create_index("ix_studies_study_instance_uid", "studies", ["study_instance_uid"])
    op.create_index("ix_studies_patient_id", "studies", ["patient_id"])
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("patient_id", sa.String(128), nullable=True),
        sa.Column("laterality", sa.String(1), nullable=True),
        sa.Column("laterality_source", sa.String(64), nullable=True),
        sa.Column("view", sa.String(8), nullable=True),
        sa.Column("view_source", sa.String(64), nullable=True),
        sa.Column("manufacturer", sa.String(128), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("columns", sa.Integer(), nullable=False),
        sa.Column("number_of_frames", sa.Integer(), nullable=False),
        sa.Column("frame_index", sa.Integer(), nullable=False),
        sa.Column("photometric", sa.String(16), nullable=True),
        sa.Column("transfer_syntax", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("sop_instance_uid", name="uq_images_sop_instance_uid"),
    )
    op.create_index("ix_images_study_id", "images", ["study_id"])
    op.create_index("ix_images_patient_id", "images", ["patient_id"])
    op.create_table(
        "embeddings",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id"), nullable=False),
        sa.Column("model_version_id", sa.Integer(), sa.ForeignKey("model_versions.id"), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("image_id", "model_version_id", name="uq_embeddings_image_model"),
    )
    op.create_index("ix_embeddings_image_id", "embeddings", ["image_id"])
    op.create_index("ix_embeddings_model_version_id", "embeddings", ["model_version_id"])
    op.create_table(
        "rejected_files",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("path", name="uq_rejected_files_path"),
    )
    op.create_index("ix_rejected_files_code", "rejected_files", ["code"])


def downgrade() -> None:
    op.drop_table("rejected_files")
    op.drop_table("embeddings")
    op.drop_table("images")
    op.drop_table("studies")
    op.drop_table("model_versions")
