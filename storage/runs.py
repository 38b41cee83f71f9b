"""Training runs: the run lease, heartbeats, outcomes, and the feedback revisions consumed.

The run lease is the one `running` row the database allows (a partial unique index): a
run that stops heartbeating is failed by the next one to start.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import AdapterVersion, FeedbackRole, RunFeedback, RunStatus, TrainingRun, utcnow

# the outcomes whose consumed revisions count as seen (by the threshold): a failed run may
# not have looked at its data
CONSUMING = (RunStatus.SUCCEEDED, RunStatus.REJECTED, RunStatus.SKIPPED)


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
                         adapter_name: str, log_path: str) -> None:
    """What the run trains on and what it will call its adapter (and commit)."""
    await _set(session, run_id, dataset_hash=dataset_hash, adapter_name=adapter_name,
               log_path=log_path)
    await session.commit()


async def record_consumed(session: AsyncSession, *, run_id: int,
                          consumed: Mapping[int, tuple[int, str]]) -> None:
    """The feedback the run read: feedback id -> (the revision read, its role); commits.
    Counts once the run finishes without failing (CONSUMING)."""
    rows = [{"run_id": run_id, "feedback_id": fid, "revision": rev, "role": role}
            for fid, (rev, role) in consumed.items()]
    for i in range(0, len(rows), 1000):  # bounded statements
        await session.execute(insert(RunFeedback), rows[i:i + 1000])
    await session.commit()


async def settle_heldout(session: AsyncSession, *, run_id: int,
                         feedback_ids: Collection[int]) -> None:
    """The run trained on these held-out feedback rows after its gate passed: their role
    in it turns from held out to trained (and commits), so neither a run continuing from its
    adapter nor the next held-out release reads them again."""
    ids = sorted(feedback_ids)
    for i in range(0, len(ids), 1000):
        await session.execute(update(RunFeedback).where(
            RunFeedback.run_id == run_id, RunFeedback.feedback_id.in_(ids[i:i + 1000]),
            RunFeedback.role == FeedbackRole.HELDOUT).values(role=FeedbackRole.TRAINED))
    await session.commit()


async def finish_run(
    session: AsyncSession, *, run_id: int, status: RunStatus, error: str | None = None,
    metrics: dict[str, Any] | None = None, dataset_hash: str | None = None,
    register: AdapterVersion | None = None,
) -> None:
    """Close the run with its outcome (the values given; None leaves a column as it is) and,
    in the same transaction, add the adapter version it `register`s; commits.

    Only a run still `running` is finished: one another run failed meanwhile (it stopped
    heartbeating) raises RunLost, and nothing is written (its adapter is not registered)."""
    if register is not None:
        session.add(register)
    values = dict(error=error, metrics=metrics, dataset_hash=dataset_hash)
    done = await session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == RunStatus.RUNNING)
        .values(status=status, finished_at=utcnow(),
                **{k: v for k, v in values.items() if v is not None}))
    if done.rowcount != 1:  # type: ignore[attr-defined]
        await session.rollback()
        raise RunLost(f"training run {run_id} is no longer running")
    await session.commit()


class RunLost(RuntimeError):
    """The run was closed by someone else (failed as stale) before it finished."""


async def _set(session: AsyncSession, run_id: int, **values: Any) -> None:
    await session.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(**values))


async def lineage(session: AsyncSession, *, adapter: str | None) -> list[int]:
    """The runs that trained `adapter` and its ancestors (what an incremental candidate
    continuing from it already knows), newest first; none for the base model (None)."""
    out: list[int] = []
    seen: set[str] = set()
    while adapter is not None and adapter not in seen:
        seen.add(adapter)
        stmt = select(AdapterVersion.run_id, AdapterVersion.parent_name).where(
            AdapterVersion.name == adapter)
        found = (await session.execute(stmt)).first()
        if found is None:
            break
        if found.run_id is not None:
            out.append(found.run_id)
        adapter = found.parent_name
    return out


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
