"""feedback revisions and what each run consumed (runfeedback), in place of id watermarks

Every feedback row gets a revision (bumped on every change); runfeedback records which
revision of which row a run read and in which role. The feedback ids at or below the old
watermarks are recorded as consumed: under the active adapter's run (so the next run
continues where it left off) and under the newest finished run (what the threshold had
seen); rows of held-out conversations as held out, so that they are trained on later.

Revision ID: 0006_feedback_revisions
Revises: 0005_identities
Create Date: 2026-12-01 11:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0006_feedback_revisions'
down_revision: str | None = '0005_identities'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CONSUMED = """
INSERT INTO runfeedback (run_id, feedback_id, revision, role)
SELECT :run_id, f.id, f.revision,
       CASE WHEN c.heldout = :held THEN 'heldout' ELSE 'trained' END
FROM feedback f
JOIN message m ON m.id = f.answer_id
JOIN conversation c ON c.id = m.conversation_id
WHERE f.id <= :watermark
  AND NOT EXISTS (SELECT 1 FROM runfeedback r WHERE r.run_id = :run_id AND r.feedback_id = f.id)
"""


def upgrade() -> None:
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.add_column(sa.Column('revision', sa.Integer(), server_default='1',
                                      nullable=False))
    op.create_table('runfeedback',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('feedback_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('role', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['trainingrun.id'], ),
    sa.PrimaryKeyConstraint('run_id', 'feedback_id')
    )
    with op.batch_alter_table('runfeedback', schema=None) as batch_op:
        batch_op.create_index('ix_runfeedback_feedback', ['feedback_id', 'revision'],
                              unique=False)
    _record_watermarks()
    # SQLite (3.35+) drops a plain column in place: recreating these tables would delete
    # rows other tables reference, which its foreign keys refuse
    with op.batch_alter_table('adapterversion', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('feedback_watermark')
    with op.batch_alter_table('trainingrun', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('feedback_watermark')


def _record_watermarks() -> None:
    """The old watermarks as consumed revisions (see the module docstring)."""
    conn = op.get_bind()
    found = [conn.execute(sa.text(
        "SELECT a.run_id, a.feedback_watermark FROM adapterversion a "
        "WHERE a.status = 'active' AND a.run_id IS NOT NULL "
        "AND a.feedback_watermark IS NOT NULL")).first(),
        conn.execute(sa.text(
            "SELECT id, feedback_watermark FROM trainingrun "
            "WHERE status IN ('succeeded', 'rejected', 'skipped') "
            "AND feedback_watermark IS NOT NULL "
            "ORDER BY feedback_watermark DESC, id DESC")).first()]
    for row in found:
        if row is not None:
            conn.execute(sa.text(_CONSUMED).bindparams(
                sa.bindparam('held', type_=sa.Boolean())),
                {'run_id': row[0], 'watermark': row[1], 'held': True})


def downgrade() -> None:
    with op.batch_alter_table('trainingrun', schema=None) as batch_op:
        batch_op.add_column(sa.Column('feedback_watermark', sa.Integer(), nullable=True))
    with op.batch_alter_table('adapterversion', schema=None) as batch_op:
        batch_op.add_column(sa.Column('feedback_watermark', sa.Integer(), nullable=True))
    conn = op.get_bind()
    conn.execute(sa.text(  # a run's watermark: the highest feedback id it read
        "UPDATE trainingrun SET feedback_watermark = "
        "(SELECT MAX(r.feedback_id) FROM runfeedback r WHERE r.run_id = trainingrun.id)"))
    conn.execute(sa.text(
        "UPDATE adapterversion SET feedback_watermark = "
        "(SELECT t.feedback_watermark FROM trainingrun t WHERE t.id = adapterversion.run_id)"))
    with op.batch_alter_table('runfeedback', schema=None) as batch_op:
        batch_op.drop_index('ix_runfeedback_feedback')
    op.drop_table('runfeedback')
    with op.batch_alter_table('feedback', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('revision')
