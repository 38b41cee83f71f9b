"""forget and audit: forgotten identities (salted hashes), run identities, tainted adapters and
runs, the audit log, the identity-hash salt, and the indexes forget and retention delete by

Revision ID: 0007_forget_audit
Revises: 0006_feedback_revisions
Create Date: 2026-12-01 11:00:00.000000
"""

import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007_forget_audit'
down_revision: str | None = '0006_feedback_revisions'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, column): forget looks people up by author and voter; deleting messages makes the
# database check the rows that reference them (answers, events), which needs these indexes
_INDEXES = (("message", "author_id"), ("message", "reply_to_id"), ("feedback", "voter_id"),
            ("inboundevent", "message_id"))


def upgrade() -> None:
    for table, column in _INDEXES:
        op.create_index(f'ix_{table}_{column}', table, [column], unique=False)
    for table in ('adapterversion', 'trainingrun'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('tainted_at', sa.DateTime(timezone=True),
                                          nullable=True))
    op.create_table(
        'runidentity',
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('identity_hash', sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['trainingrun.id']),
        sa.PrimaryKeyConstraint('run_id', 'identity_hash'),
    )
    op.create_index('ix_runidentity_identity_hash', 'runidentity', ['identity_hash'],
                    unique=False)
    op.create_table(
        'forgottenidentity',
        sa.Column('identity_hash', sa.String(length=64), nullable=False),
        sa.Column('forgotten_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('identity_hash'),
    )
    secret = op.create_table(
        'installationsecret',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('value', sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )
    # the salt of identity hashes: random per installation, so a hash found elsewhere (a
    # backup, a log) cannot be matched against a list of guessed identities
    op.bulk_insert(secret, [{'name': 'identity_salt', 'value': secrets.token_hex(32)}])
    op.create_table(
        'auditlog',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('actor', sa.String(length=160), nullable=False),
        sa.Column('action', sa.String(length=32), nullable=False),
        sa.Column('target', sa.String(length=256), nullable=False),
        sa.Column('detail', sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_auditlog_action', 'auditlog', ['action'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_auditlog_action', table_name='auditlog')
    op.drop_table('auditlog')
    op.drop_table('installationsecret')
    op.drop_table('forgottenidentity')
    op.drop_index('ix_runidentity_identity_hash', table_name='runidentity')
    op.drop_table('runidentity')
    for table in ('trainingrun', 'adapterversion'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('tainted_at')
    for table, column in reversed(_INDEXES):
        op.drop_index(f'ix_{table}_{column}', table_name=table)
