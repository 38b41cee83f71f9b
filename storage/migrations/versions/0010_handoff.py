"""human hand-off: who holds a conversation, escalations, relayed messages

Revision ID: 0010_handoff
Revises: 0009_answer_memory
Create Date: 2026-12-01 14:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010_handoff'
down_revision: str | None = '0009_answer_memory'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = dict(timezone=True)


def upgrade() -> None:
    op.create_table(
        'handoff',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('conversation_id', sa.Integer(), nullable=False),
        sa.Column('channel', sa.String(length=32), nullable=False),
        sa.Column('chat_id', sa.String(length=128), nullable=False),
        sa.Column('thread_id', sa.String(length=128), nullable=False),
        sa.Column('user_id', sa.String(length=128), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('reason', sa.String(length=32), nullable=False),
        sa.Column('answer_id', sa.Integer(), nullable=True),
        sa.Column('adapter', sa.String(length=128), nullable=True),
        sa.Column('feedback_id', sa.Integer(), nullable=True),
        sa.Column('pair_open', sa.Boolean(), nullable=False),
        sa.Column('agent_chat', sa.String(length=128), nullable=True),
        sa.Column('agent_ref', sa.String(length=128), nullable=True),
        sa.Column('agent_id', sa.String(length=128), nullable=True),
        sa.Column('agent_name', sa.String(length=128), nullable=True),
        sa.Column('requested_at', sa.DateTime(**_TS), nullable=False),
        sa.Column('taken_at', sa.DateTime(**_TS), nullable=True),
        sa.Column('last_agent_at', sa.DateTime(**_TS), nullable=True),
        sa.Column('apologised_at', sa.DateTime(**_TS), nullable=True),
        sa.Column('closed_at', sa.DateTime(**_TS), nullable=True),
        sa.Column('closed_by', sa.String(length=160), nullable=True),
        sa.Column('error', sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_handoff_conversation_id', 'handoff', ['conversation_id'], unique=False)
    op.create_index('ux_handoff_open', 'handoff', ['conversation_id'], unique=True,
                    sqlite_where=sa.text("status != 'closed'"),
                    postgresql_where=sa.text("status != 'closed'"))
    op.create_index('ix_handoff_agent_ref', 'handoff', ['agent_chat', 'agent_ref'], unique=False)
    op.create_index('ix_handoff_status', 'handoff', ['status'], unique=False)
    op.create_table(
        'handoffmessage',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('handoff_id', sa.Integer(), nullable=False),
        sa.Column('direction', sa.String(length=8), nullable=False),
        sa.Column('author_id', sa.String(length=128), nullable=False),
        sa.Column('text', sa.String(), nullable=False),
        sa.Column('created_at', sa.DateTime(**_TS), nullable=False),
        sa.Column('delivered_at', sa.DateTime(**_TS), nullable=True),
        sa.Column('error', sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(['handoff_id'], ['handoff.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_handoffmessage_handoff_id', 'handoffmessage', ['handoff_id'])
    op.create_index('ix_handoffmessage_author_id', 'handoffmessage', ['author_id'])


def downgrade() -> None:
    op.drop_index('ix_handoffmessage_author_id', table_name='handoffmessage')
    op.drop_index('ix_handoffmessage_handoff_id', table_name='handoffmessage')
    op.drop_table('handoffmessage')
    op.drop_index('ix_handoff_status', table_name='handoff')
    op.drop_index('ix_handoff_agent_ref', table_name='handoff')
    op.drop_index('ux_handoff_open', table_name='handoff')
    op.drop_index('ix_handoff_conversation_id', table_name='handoff')
    op.drop_table('handoff')
