"""Training runs: the run lease, heartbeats, outcomes, and the watermark of feedback seen.

The run lease is the one `running` row the database allows (a partial unique index): a
run that stops heartbeating is failed by the next one to start.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import AdapterVersion, RunStatus, TrainingRun, utcnow

# the outcomes whose watermark counts as seen: a failed run may not have looked at its data
_SEEN = (RunStatus.SUCCEEDED, RunStatus.REJECTED, RunStatus.SKIPPED)


async def start_run(session: AsyncSession, *, trigger: str, stale_after: timedelta) -> int | None:
    """Take the run lease (a new `running` row, committed) after failing a running run that
    has not heartbeated for `stale_after`; None while another live run holds the lease."""
    now = utcnow()
    await session.execute(update(TrainingRun)
                          .where(TrainingRun.status == RunStatus.RUNNING,
                                 TrainingRun.heartbeat_at < now - stale_after)
                          .values(status=RunStatus.FAILED, finished_at=now,
                                  error="interrupted: the run stopped heartbeating"))
    run = TrainingRun(status=RunStatus.RUNNING, trigger=trigger, heartbeat_at=now)
    session.add(run)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        return None
    return run.id


async def heartbeat(session: AsyncSession, *, run_id: int) -> None:
    """The run is alive (and commit)."""
    await _set(session, run_id, heartbeat_at=utcnow())
    await session.commit()


async def record_dataset(session: AsyncSession, *, run_id: int, dataset_hash: str,
                         feedback_watermark: int, adapter_name: str, log_path: str) -> None:
    """What the run trains on and what it will call its adapter (and commit)."""
    await _set(session, run_id, dataset_hash=dataset_hash, feedback_watermark=feedback_watermark,
               adapter_name=adapter_name, log_path=log_path)
    await session.commit()


async def finish_run(
    session: AsyncSession, *, run_id: int, status: RunStatus, error: str | None = None,
    metrics: dict[str, Any] | None = None, dataset_hash: str | None = None,
    feedback_watermark: int | None = None, register: AdapterVersion | None = None,
) -> None:
    """Close the run with its outcome (the values given; None leaves a column as it is) and,
    in the same transaction, add the adapter version it `register`s; commits."""
    if register is not None:
        session.add(register)
    values = dict(error=error, metrics=metrics, dataset_hash=dataset_hash,
                  feedback_watermark=feedback_watermark)
    await _set(session, run_id, status=status, finished_at=utcnow(),
               **{k: v for k, v in values.items() if v is not None})
    await session.commit()


async def _set(session: AsyncSession, run_id: int, **values: Any) -> None:
    await session.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(**values))


async def seen_watermark(session: AsyncSession) -> int:
    """The highest feedback watermark of a run that finished without failing (succeeded,
    rejected or skipped): feedback up to it has been considered; 0 if none."""
    stmt = select(func.max(TrainingRun.feedback_watermark)).where(TrainingRun.status.in_(_SEEN))
    return int((await session.execute(stmt)).scalar() or 0)


async def last_started(session: AsyncSession) -> datetime | None:
    """When the newest run started (timezone-aware), if any has."""
    when = (await session.execute(select(func.max(TrainingRun.started_at)))).scalar()
    if when is None:
        return None
    return when if when.tzinfo else when.replace(tzinfo=utcnow().tzinfo)


async def recent_runs(session: AsyncSession, *, limit: int = 20) -> list[TrainingRun]:
    """The newest runs, newest first (fresh from the database)."""
    stmt = select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)
    return list((await session.execute(stmt.execution_options(populate_existing=True))).scalars())
