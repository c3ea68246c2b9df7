"""A rejected file records what it was (a fingerprint: size, modification time, inode, ...), so that a
file whose decoding process died is not decoded again, at the cost of a worker restart each run, until
it changes

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rejected_files") as batch:
        batch.add_column(sa.Column("fingerprint", sa.String(80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rejected_files") as batch:
        batch.drop_column("fingerprint")
