"""conversation.heldout: the learning loop's held-out/training split, recorded once per
conversation so that it stays stable across runs

Revision ID: 0004_conversation_split
Revises: 0003_event_lease
Create Date: 2026-11-29 18:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004_conversation_split'
down_revision: str | None = '0003_event_lease'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.add_column(sa.Column('heldout', sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.drop_column('heldout')
