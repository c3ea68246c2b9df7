"""A rejected file counts its rejections in a row with the same code and fingerprint, so that a file
whose decoding process died is skipped only once it died on two runs (one death may be the machine's)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rejected_files") as batch:
        batch.add_column(sa.Column("repeats", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("rejected_files") as batch:
        batch.drop_column("repeats")
