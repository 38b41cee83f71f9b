"""operator console accounts and sessions (filled by the console work)

Revision ID: 0008_operators
Revises: 0007_forget_audit
Create Date: 2026-12-01 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision: str = '0008_operators'
down_revision: str | None = '0007_forget_audit'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
