"""Identity hashes: forgotten people, whose data each run used, and tainted runs and adapters.

An identity (`telegram:123`) is kept only as an HMAC-SHA256 under a per-installation random
salt (made by the migration, or at first use): enough to recognise a forgotten person's new
data, and whose data a run used, without storing who they are.

A run is tainted when data it used is forgotten; an adapter is tainted when its run is, or
when it was trained from a tainted adapter (its parent), transitively.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Collection, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import exists, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import (
    AdapterStatus,
    AdapterVersion,
    Feedback,
    ForgottenIdentity,
    InstallationSecret,
    Message,
    Role,
    RunIdentity,
    TrainingRun,
    utcnow,
)
from storage.sql import is_postgres, upsert

SALT = "identity_salt"
CHUNK = 5000  # ids per IN list: well below both databases' bound-parameter limits


def chunks(ids: Iterable[Any], size: int = CHUNK) -> Iterator[list[Any]]:
    """`ids` sorted, in lists of at most `size`."""
    ordered = sorted(ids)
    for i in range(0, len(ordered), size):
        yield ordered[i:i + size]


async def identity_salt(session: AsyncSession) -> str:
    """The installation's salt; created if missing (then committed: call it before starting
    a transaction of your own)."""
    stmt = select(InstallationSecret.value).where(InstallationSecret.name == SALT)
    found = (await session.execute(stmt)).scalar()
    if found is not None:
        return str(found)
    await session.execute(upsert(session)(InstallationSecret)
                          .values(name=SALT, value=secrets.token_hex(32))
                          .on_conflict_do_nothing(index_elements=["name"]))
    await session.commit()  # a concurrent creator's salt wins
    return str((await session.execute(stmt)).scalar_one())


def identity_hash(salt: str, identity: str) -> str:
    """The salted hash of an identity, as stored (64 hex characters)."""
    return hmac.new(salt.encode(), identity.encode(), hashlib.sha256).hexdigest()


async def hashes(session: AsyncSession, identities: Iterable[str]) -> dict[str, str]:
    """identity -> its salted hash."""
    salt = await identity_salt(session)
    return {who: identity_hash(salt, who) for who in set(identities)}


async def forgotten(session: AsyncSession, identities: Iterable[str]) -> set[str]:
    """Those of these identities that were forgotten."""
    wanted = set(identities)
    if not wanted or not await _any_forgotten(session):
        return set()
    by_hash = {h: who for who, h in (await hashes(session, wanted)).items()}
    out: set[str] = set()
    for part in chunks(by_hash):
        stmt = select(ForgottenIdentity.identity_hash).where(
            ForgottenIdentity.identity_hash.in_(part))
        out.update(by_hash[h] for h in (await session.execute(stmt)).scalars())
    return out


async def _any_forgotten(session: AsyncSession) -> bool:
    return bool((await session.execute(select(exists().select_from(ForgottenIdentity)))).scalar())


def mark_forgotten(session: AsyncSession, identity_hash: str) -> Any:
    """The statement that adds a forgotten identity's hash (for the caller's transaction)."""
    return (upsert(session)(ForgottenIdentity)
            .values(identity_hash=identity_hash, forgotten_at=utcnow())
            .on_conflict_do_nothing(index_elements=["identity_hash"]))


# ---- what datasets leave out ----


class _Row(Protocol):
    @property
    def voter_id(self) -> str: ...
    @property
    def question_id(self) -> int: ...


R = TypeVar("R", bound=_Row)


async def without_forgotten(session: AsyncSession, rows: Sequence[R]) -> list[R]:
    """The feedback rows neither given by nor about a question of a forgotten person (who
    wrote again after being forgotten): what datasets and exports may use."""
    if not rows or not await _any_forgotten(session):
        return list(rows)
    authors = await _authors(session, {r.question_id for r in rows})
    gone = await forgotten(session, {r.voter_id for r in rows} | set(authors.values()))
    return [r for r in rows if r.voter_id not in gone and authors.get(r.question_id) not in gone]


async def forgotten_messages(session: AsyncSession, *, conversation_ids: Collection[int]
                             ) -> set[int]:
    """Messages of these conversations written by forgotten people, and the answers to
    them: left out of prompt contexts."""
    if not conversation_ids or not await _any_forgotten(session):
        return set()
    authored: dict[int, str] = {}
    for part in chunks(conversation_ids):
        stmt = select(Message.id, Message.author_id).where(
            Message.conversation_id.in_(part), Message.author_id.is_not(None))
        authored.update({m: a for m, a in (await session.execute(stmt)).all()})
    gone = await forgotten(session, set(authored.values()))
    mine = {m for m, a in authored.items() if a in gone}
    answers: set[int] = set()
    for part in chunks(mine):
        stmt = select(Message.id).where(Message.reply_to_id.in_(part))
        answers.update((await session.execute(stmt)).scalars())
    return mine | answers


async def _authors(session: AsyncSession, message_ids: Collection[int]) -> dict[int, str]:
    out: dict[int, str] = {}
    for part in chunks(message_ids):
        stmt = select(Message.id, Message.author_id).where(Message.id.in_(part),
                                                          Message.author_id.is_not(None))
        out.update({m: a for m, a in (await session.execute(stmt)).all()})
    return out


# ---- whose data runs used ----


async def record_run_identities(session: AsyncSession, *, run_id: int,
                                conversation_ids: Collection[int],
                                answer_ids: Collection[int]) -> int:
    """Record (and commit) who a run's dataset comes from: everyone who wrote in its
    conversations (prompt contexts include their turns) and who voted on or corrected its
    answers. Returns how many people."""
    people: set[str] = set()
    for part in chunks(conversation_ids):
        stmt = select(Message.author_id).distinct().where(
            Message.conversation_id.in_(part), Message.role == Role.USER,
            Message.author_id.is_not(None))
        people.update((await session.execute(stmt)).scalars())
    for part in chunks(answer_ids):
        stmt = select(Feedback.voter_id).distinct().where(Feedback.answer_id.in_(part))
        people.update((await session.execute(stmt)).scalars())
    hashed = await hashes(session, people)
    rows = [{"run_id": run_id, "identity_hash": h} for h in sorted(hashed.values())]
    for i in range(0, len(rows), 1000):
        await session.execute(upsert(session)(RunIdentity).values(rows[i:i + 1000])
                              .on_conflict_do_nothing())
    await session.commit()
    return len(rows)


async def runs_of(session: AsyncSession, identity_hash: str) -> set[int]:
    """The runs whose datasets used this person's data."""
    stmt = select(RunIdentity.run_id).where(RunIdentity.identity_hash == identity_hash)
    return set((await session.execute(stmt)).scalars())


# ---- tainted runs and adapters ----


async def taint(session: AsyncSession, *, run_ids: Collection[int]) -> list[str]:
    """Mark these runs tainted, then every adapter trained on them or from a tainted adapter;
    commits. Returns the adapters newly tainted.

    A run still training is marked too: its adapter is tainted when it registers
    (`propagate_taint`). On PostgreSQL the adapter table is locked against new versions
    meanwhile, so that a version registered concurrently is seen either here or by the
    registering run's own `propagate_taint`."""
    if is_postgres(session):
        await session.execute(text("LOCK TABLE adapterversion IN SHARE ROW EXCLUSIVE MODE"))
    now = utcnow()
    for part in chunks(run_ids):
        await session.execute(update(TrainingRun)
                              .where(TrainingRun.id.in_(part), TrainingRun.tainted_at.is_(None))
                              .values(tainted_at=now))
    names = await _propagate(session)
    await _strip_samples(session, run_ids)
    await session.commit()
    return names


SAMPLES = "heldout_answers"  # the model's answers to held-out questions: they may quote them


def without_samples(metrics: Any) -> Any:
    """`metrics` (a run's or an adapter's report) without the model's sample answers."""
    if isinstance(metrics, dict):
        return {k: without_samples(v) for k, v in metrics.items() if k != SAMPLES}
    return metrics


async def _strip_samples(session: AsyncSession, run_ids: Collection[int]) -> None:
    """Drop the sample answers from the reports of these runs and of their adapters."""
    for model, key in ((TrainingRun, TrainingRun.id), (AdapterVersion, AdapterVersion.run_id)):
        for part in chunks(run_ids):
            rows = (await session.execute(select(key, model.metrics)  # type: ignore[attr-defined]
                                          .where(key.in_(part)))).all()
            for row_key, metrics in rows:
                if metrics is not None and without_samples(metrics) != metrics:
                    await session.execute(update(model).where(key == row_key)
                                          .values(metrics=without_samples(metrics)))


async def adapter_paths(session: AsyncSession, *, run_ids: Collection[int]) -> list[str]:
    """Where the adapters these runs trained are (their report.json files)."""
    out: list[str] = []
    for part in chunks(run_ids):
        stmt = select(AdapterVersion.path).where(AdapterVersion.run_id.in_(part))
        out += list((await session.execute(stmt)).scalars())
    return out


async def propagate_taint(session: AsyncSession) -> list[str]:
    """Taint the adapters whose run or parent is tainted (a run registering its adapter
    calls it after committing); commits. Returns the adapters newly tainted."""
    names = await _propagate(session)
    await session.commit()
    return names


async def _propagate(session: AsyncSession) -> list[str]:
    runs = dict((await session.execute(select(TrainingRun.id, TrainingRun.tainted_at)
                                       .where(TrainingRun.tainted_at.is_not(None)))).all())
    a = AdapterVersion
    versions = (await session.execute(select(a.name, a.parent_name, a.run_id, a.tainted_at)
                                      .order_by(a.id))).all()
    tainted = {name: when for name, _, _, when in versions if when is not None}
    marked: dict[str, datetime] = {}
    changed = True
    while changed:  # lineage chains are short; parents may come after children in id order
        changed = False
        for name, parent, run_id, _ in versions:
            if name in tainted:
                continue
            when = runs.get(run_id) or tainted.get(parent or "")
            if when is not None:
                tainted[name] = marked[name] = when
                changed = True
    for name, when in marked.items():
        await session.execute(update(a).where(a.name == name).values(tainted_at=when))
    return sorted(marked)


async def retrain_due(session: AsyncSession) -> str | None:
    """Why a run should start now although no feedback is new: an adapter in service, or
    rejected for it, was tainted after the last run started; else None."""
    a = AdapterVersion
    serving = a.status.in_([AdapterStatus.ACTIVE, AdapterStatus.CANARY])
    rejected_since = (a.status == AdapterStatus.REJECTED) & (a.updated_at >= a.tainted_at)
    stmt = (select(a.name).where(a.tainted_at.is_not(None), serving | rejected_since)
            .order_by(a.tainted_at.desc()).limit(1))
    last = (await session.execute(select(func.max(TrainingRun.started_at)))).scalar()
    if last is not None:
        stmt = stmt.where(a.tainted_at > _aware(last))
    name = (await session.execute(stmt)).scalar()
    return None if name is None else f"{name} was trained on data since forgotten"


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)
