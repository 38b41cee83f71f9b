"""The review queue: corrections from untrusted users wait here until a reviewer decides."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import aliased
from sqlmodel.ext.asyncio.session import AsyncSession

from storage.models import Feedback, Message, ReviewStatus, utcnow


@dataclass(frozen=True, slots=True)
class PendingCorrection:
    feedback_id: int
    voter_id: str
    question: str
    answer: str
    correction: str


class NotPending(LookupError):
    """No pending correction has this id."""


async def pending(session: AsyncSession, *, limit: int = 50) -> list[PendingCorrection]:
    answer, question = aliased(Message), aliased(Message)
    stmt = (select(Feedback, answer.text, question.text)
            .join(answer, answer.id == Feedback.answer_id)
            .join(question, question.id == answer.reply_to_id)
            .where(Feedback.review_status == ReviewStatus.PENDING,
                   Feedback.correction.is_not(None))
            .order_by(Feedback.id).limit(limit))
    return [PendingCorrection(fb.id or 0, fb.voter_id, q, a, fb.correction or "")
            for fb, a, q in (await session.execute(stmt)).all()]


async def decide(session: AsyncSession, *, feedback_id: int, approve: bool) -> None:
    """Approve (the correction becomes training data) or reject a pending correction."""
    status = ReviewStatus.APPROVED if approve else ReviewStatus.REJECTED
    result = await session.execute(
        update(Feedback)
        .where(Feedback.id == feedback_id, Feedback.review_status == ReviewStatus.PENDING)
        .values(review_status=status, updated_at=utcnow()))
    await session.commit()
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise NotPending(f"no pending correction with id {feedback_id}")
