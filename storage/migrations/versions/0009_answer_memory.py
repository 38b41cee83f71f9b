"""answer memory entries and their embeddings (filled by the answer-memory work)

Revision ID: 0009_answer_memory
Revises: 0008_operators
Create Date: 2026-12-01 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009_answer_memory'
down_revision: str | None = '0008_operators'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'memoryentry',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('question', sa.String(), nullable=False),
        sa.Column('context', sa.String(), nullable=True),
        sa.Column('answer', sa.String(), nullable=False),
        sa.Column('source', sa.String(length=16), nullable=False),
        sa.Column('feedback_id', sa.Integer(), nullable=True),
        sa.Column('asked_by', sa.String(length=128), nullable=True),
        sa.Column('approved_by', sa.String(length=160), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('disabled_by', sa.String(length=160), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('embedder', sa.String(length=128), nullable=True),
        sa.Column('embedding', sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('feedback_id'),
    )
    op.create_index('ix_memoryentry_asked_by', 'memoryentry', ['asked_by'], unique=False)
    op.create_index('ix_memoryentry_approved_by', 'memoryentry', ['approved_by'], unique=False)
    op.create_index('ix_memoryentry_updated_at', 'memoryentry', ['updated_at'], unique=False)
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('memory_entry_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('memory_refs', sa.JSON(), nullable=True))
        batch_op.create_index('ix_message_memory_entry_id', ['memory_entry_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_index('ix_message_memory_entry_id')
        batch_op.drop_column('memory_refs')
        batch_op.drop_column('memory_entry_id')
    op.drop_index('ix_memoryentry_updated_at', table_name='memoryentry')
    op.drop_index('ix_memoryentry_approved_by', table_name='memoryentry')
    op.drop_index('ix_memoryentry_asked_by', table_name='memoryentry')
    op.drop_table('memoryentry')
