"""operator console: operator accounts and their sessions, the console's signing key, the
indexes its pages read by and the quality page's per-day roll-up

Revision ID: 0008_operators
Revises: 0007_forget_audit
Create Date: 2026-12-01 14:00:00.000000
"""

import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008_operators'
down_revision: str | None = '0007_forget_audit'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CONSOLE_KEY = 'console_key'


def upgrade() -> None:
    op.create_table(
        'operator',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('role', sa.String(length=16), nullable=False),
        sa.Column('password_hash', sa.String(length=256), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_login_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('name'),
    )
    op.create_table(
        'operatorsession',
        sa.Column('id', sa.String(length=64), nullable=False),  # sha256 of the cookie's token
        sa.Column('operator_id', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['operator_id'], ['operator.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_operatorsession_operator_id', 'operatorsession', ['operator_id'],
                    unique=False)
    # the key signing the console's cookies and CSRF tokens: random per installation and
    # shared by every gateway replica through the database
    secret = sa.table('installationsecret', sa.column('name', sa.String),
                      sa.column('value', sa.String))
    op.bulk_insert(secret, [{'name': CONSOLE_KEY, 'value': secrets.token_hex(32)}])
    # the review queue (pending corrections) and the pages listing by time
    op.create_index('ix_feedback_review_status', 'feedback', ['review_status'], unique=False)
    op.create_index('ix_message_created_at', 'message', ['created_at'], unique=False)
    op.create_index('ix_conversation_created_at', 'conversation', ['created_at'], unique=False)
    # the quality page: answers by time, read from the index alone on PostgreSQL (partial:
    # answers only); votes changed since a day's roll-up was computed (storage.console)
    op.create_index('ix_message_answer_created_at', 'message', ['created_at'], unique=False,
                    postgresql_include=['id', 'conversation_id', 'adapter', 'status',
                                        'error_kind', 'ttft_ms', 'latency_ms'],
                    postgresql_where=sa.text("role = 'assistant'"),
                    sqlite_where=sa.text("role = 'assistant'"))
    op.create_index('ix_feedback_updated_at', 'feedback', ['updated_at'], unique=False)
    # the quality page's roll-up: one row per closed UTC day, its answers and votes counted
    # per channel, adapter, status and failure kind (a cache: storage.console recomputes a
    # day whose votes changed, after a forget, and at least every few hours)
    op.create_table(
        'qualityday',
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('computed_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('counts', sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint('day'),
    )
    if op.get_bind().dialect.name == 'postgresql':
        # conversation search by text: lower(text) LIKE '%words%' through trigrams (an
        # expression index, so the models need not describe it; SQLite scans)
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        op.execute("CREATE INDEX ix_message_text_trgm ON message "
                   "USING gin (lower(text) gin_trgm_ops)")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_message_text_trgm")
    op.drop_table('qualityday')
    op.drop_index('ix_feedback_updated_at', table_name='feedback')
    op.drop_index('ix_message_answer_created_at', table_name='message')
    op.drop_index('ix_conversation_created_at', table_name='conversation')
    op.drop_index('ix_message_created_at', table_name='message')
    op.drop_index('ix_feedback_review_status', table_name='feedback')
    op.execute(sa.text("DELETE FROM installationsecret WHERE name = 'console_key'"))
    op.drop_index('ix_operatorsession_operator_id', table_name='operatorsession')
    op.drop_table('operatorsession')
    op.drop_table('operator')
