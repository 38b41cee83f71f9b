"""The audit log: who approved, rejected, promoted, rolled back, forgot or deleted what, and when.

Actors are a reviewer's identity (`telegram:111`), `cli:<operating-system user>` for the
command line, or `system:<job>` for the scheduler's own decisions (`system:canary`,
`system:retention`). Entries are only added; forget replaces a forgotten person's identity
as an actor by their salted hash (`storage.forget`).
"""

from __future__ import annotations

import getpass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import AuditLog, utcnow


class Action:
    """The audited actions (auditlog.action)."""

    APPROVE = "approve"
    REJECT = "reject"
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    FORGET = "forget"
    RETENTION = "retention"


# the actions that delete personal data: a training run whose dataset was built while one
# of these committed starts again (feedback.erasure)
ERASURES = (Action.FORGET, Action.RETENTION)
CANARY = "system:canary"
RETENTION = "system:retention"


def cli_actor() -> str:
    """The actor of a command-line action: the operating-system user running it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        user = "unknown"
    return f"cli:{user}"


def record(session: AsyncSession, *, actor: str, action: str, target: str,
           detail: dict[str, Any] | None = None) -> AuditLog:
    """Add an entry to the session: it commits with the caller's transaction."""
    entry = AuditLog(at=utcnow(), actor=actor[:160], action=action, target=target[:256],
                     detail=detail)
    session.add(entry)
    return entry


async def log(session: AsyncSession, *, actor: str, action: str, target: str,
              detail: dict[str, Any] | None = None) -> None:
    """Record an entry on its own (and commit): for actions another function committed."""
    record(session, actor=actor, action=action, target=target, detail=detail)
    await session.commit()


async def recent(session: AsyncSession, *, limit: int = 50,
                 action: str | None = None) -> list[AuditLog]:
    """The newest entries first (of one action, if given)."""
    stmt = select(AuditLog).order_by(AuditLog.id.desc()).limit(limit)
    if action is not None:
        stmt = stmt.where(AuditLog.action == action)
    return list((await session.execute(stmt)).scalars())


async def erasure_count(session: AsyncSession) -> int:
    """How many forgets and retention deletions have been committed (it only grows)."""
    stmt = select(func.count()).select_from(AuditLog).where(AuditLog.action.in_(ERASURES))
    return int((await session.execute(stmt)).scalar() or 0)
