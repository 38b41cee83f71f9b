"""Adapter versions: versioned names, status, lineage; promotion and rollback.

Statuses move candidate -> canary -> active -> retired, or canary -> rejected.
At most one adapter is active and at most one is canary. A name is never
reused (it is derived from the training run id), so a backend never re-loads
new weights under an old name. The learning loop writes new versions here; the
serving side (`inference.registry.AdapterRegistry`) reads what to serve through
a source the composition root builds from `lifecycle`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import AdapterStatus, AdapterVersion, utcnow


class RegistryError(RuntimeError):
    """An operation the adapter versions' state does not allow (the message says why)."""


@dataclass(frozen=True, slots=True)
class Serving:
    active: AdapterVersion | None
    canary: AdapterVersion | None


@dataclass(frozen=True, slots=True)
class VersionState:
    """What serving needs to know of one version (no metrics): read at every refresh."""

    name: str
    status: str
    path: str
    rank: int
    updated_at: datetime  # when the status last changed (timezone-aware)


def adapter_name(prefix: str, run_id: int) -> str:
    return f"{prefix}-v{run_id}"


async def serving(session: AsyncSession) -> Serving:
    stmt = select(AdapterVersion).where(
        AdapterVersion.status.in_([AdapterStatus.ACTIVE, AdapterStatus.CANARY]))
    rows = list((await session.execute(stmt.execution_options(populate_existing=True))).scalars())
    pick = {r.status: r for r in rows}
    return Serving(pick.get(AdapterStatus.ACTIVE), pick.get(AdapterStatus.CANARY))


async def lifecycle(session: AsyncSession) -> list[VersionState]:
    """Every version's name, status, path, rank and last status change, oldest first."""
    a = AdapterVersion
    stmt = select(a.name, a.status, a.path, a.rank, a.updated_at).order_by(a.id)
    return [VersionState(name, status, path, rank,
                         changed if changed.tzinfo else changed.replace(tzinfo=UTC))
            for name, status, path, rank, changed in (await session.execute(stmt)).all()]


async def get(session: AsyncSession, name: str) -> AdapterVersion | None:
    stmt = select(AdapterVersion).where(AdapterVersion.name == name)
    return (await session.execute(stmt.execution_options(populate_existing=True))).scalar()


def new_version(*, name: str, path: str, rank: int, parent_name: str | None, run_id: int | None,
                dataset_hash: str, metrics: dict[str, Any],
                status: AdapterStatus = AdapterStatus.CANARY) -> AdapterVersion:
    """A version row for a candidate that passed the gate (the caller adds it, in the run's
    transaction)."""
    return AdapterVersion(name=name, path=path, rank=rank, parent_name=parent_name, run_id=run_id,
                          dataset_hash=dataset_hash, metrics=metrics, status=status)


async def _set(session: AsyncSession, name: str, status: AdapterStatus) -> None:
    await session.execute(update(AdapterVersion).where(AdapterVersion.name == name)
                          .values(status=status, updated_at=utcnow()))


async def promote(session: AsyncSession, *, name: str) -> None:
    """Make `name` the active adapter; the previous active one is retired."""
    target = await get(session, name)
    if target is None:
        raise RegistryError(f"no adapter named {name!r}")
    if target.status in (AdapterStatus.ACTIVE, AdapterStatus.REJECTED):
        raise RegistryError(f"adapter {name!r} is {target.status}: cannot promote it")
    now = await serving(session)
    if now.active is not None:
        await _set(session, now.active.name, AdapterStatus.RETIRED)
    await _set(session, name, AdapterStatus.ACTIVE)
    await session.commit()


async def rollback(session: AsyncSession) -> tuple[str, str | None]:
    """Undo the newest change: reject the canary, else retire the active adapter.

    Returns (the adapter taken out of service, what the active route is now).
    """
    now = await serving(session)
    if now.canary is not None:
        await _set(session, now.canary.name, AdapterStatus.REJECTED)
        await session.commit()
        return now.canary.name, now.active.name if now.active else None
    if now.active is None:
        raise RegistryError("nothing to roll back: no canary and no active adapter")
    await _set(session, now.active.name, AdapterStatus.RETIRED)
    parent = await get(session, now.active.parent_name) if now.active.parent_name else None
    restored = None
    if parent is not None and parent.status == AdapterStatus.RETIRED:
        await _set(session, parent.name, AdapterStatus.ACTIVE)
        restored = parent.name
    await session.commit()
    return now.active.name, restored


async def all_versions(session: AsyncSession) -> list[AdapterVersion]:
    stmt = select(AdapterVersion).order_by(AdapterVersion.id)
    return list((await session.execute(stmt.execution_options(populate_existing=True))).scalars())
