"""answer memory entries and their embeddings (filled by the answer-memory work)

Revision ID: 0009_answer_memory
Revises: 0008_operators
Create Date: 2026-12-01 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision: str = '0009_answer_memory'
down_revision: str | None = '0008_operators'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
