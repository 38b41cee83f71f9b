"""The review queue: corrections from untrusted users wait here until a reviewer decides."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from storage import audit
from storage import feedback as store
from storage.feedback import PendingCorrection

__all__ = ["NotPending", "PendingCorrection", "decide", "pending"]


class NotPending(LookupError):
    """No pending correction has this id."""


async def pending(session: AsyncSession, *, limit: int = 50) -> list[PendingCorrection]:
    """Corrections awaiting review, oldest first."""
    return await store.pending_corrections(session, limit=limit)


async def decide(session: AsyncSession, *, feedback_id: int, approve: bool,
                 actor: str | None = None) -> None:
    """Approve (the correction becomes training data) or reject a pending correction, and
    audit it as done by `actor` (a reviewer's identity; by default the operating-system
    user, as for the command line)."""
    actor = actor or audit.cli_actor()
    if not await store.review_correction(session, feedback_id=feedback_id, approve=approve,
                                         actor=actor):
        raise NotPending(f"no pending correction with id {feedback_id}")
    await audit.log(session, actor=actor,
                    action=audit.Action.APPROVE if approve else audit.Action.REJECT,
                    target=f"feedback:{feedback_id}")
