"""The operator console's reads: the review queue with context, conversation search and
threads, the quality dashboard's aggregates, and the training runs' dataset roles.

Every page reads a bounded number of rows: lists are limited and paged by id, aggregates
are grouped in the database over a bounded time window (indexes from migration 0008).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import astuple, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, case, delete, exists, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from storage.audit import ERASURES
from storage.models import (
    AnswerStatus,
    AuditLog,
    Conversation,
    Feedback,
    Message,
    QualityDay,
    ReviewStatus,
    Role,
    RunFeedback,
    utcnow,
)


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)  # SQLite's are naive UTC


def _postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


@dataclass(frozen=True, slots=True)
class Line:
    """A message as the console shows it."""

    id: int
    role: str
    text: str
    author_id: str | None
    created_at: datetime
    adapter: str | None = None
    model: str | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status: str | None = None
    error_kind: str | None = None
    reply_to_id: int | None = None


_LINE = (Message.id, Message.role, Message.text, Message.author_id, Message.created_at,
         Message.adapter, Message.model, Message.latency_ms, Message.ttft_ms,
         Message.prompt_tokens, Message.completion_tokens, Message.status, Message.error_kind,
         Message.reply_to_id)


def _line(row: Any) -> Line:
    return Line(*row[:4], _aware(row[4]), *row[5:])


# ---- the review queue ----


@dataclass(frozen=True, slots=True)
class QueueItem:
    feedback_id: int
    voter_id: str
    channel: str
    created_at: datetime
    correction: str
    answer_id: int
    answer: str
    adapter: str | None
    question: str
    conversation_id: int
    context: list[Line] = field(default_factory=list)  # the messages before the question


def _pending() -> Any:
    return and_(Feedback.review_status == ReviewStatus.PENDING, Feedback.correction.is_not(None))


async def pending_counts(session: AsyncSession) -> dict[str, int]:
    """Pending corrections per channel."""
    stmt = (select(Conversation.channel, func.count())
            .select_from(Feedback)
            .join(Message, Message.id == Feedback.answer_id)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(_pending()).group_by(Conversation.channel))
    return {channel: int(n) for channel, n in (await session.execute(stmt)).all()}


async def review_queue(session: AsyncSession, *, channel: str | None = None, limit: int = 20,
                       context: int = 4) -> list[QueueItem]:
    """Pending corrections, oldest first, each with up to `context` messages before it."""
    answer, question = aliased(Message, name="answer"), aliased(Message, name="question")
    stmt = (select(Feedback.id, Feedback.voter_id, Conversation.channel, Feedback.created_at,
                   Feedback.correction, answer.id, answer.text, answer.adapter, question.text,
                   answer.conversation_id, question.id)
            .join(answer, answer.id == Feedback.answer_id)
            .join(question, question.id == answer.reply_to_id)
            .join(Conversation, Conversation.id == answer.conversation_id)
            .where(_pending()).order_by(Feedback.id).limit(limit))
    if channel:
        stmt = stmt.where(Conversation.channel == channel)
    items = []
    for (fid, voter, chan, created, correction, aid, atext, adapter, qtext, conv,
         qid) in (await session.execute(stmt)).all():
        before = (select(*_LINE).where(Message.conversation_id == conv, Message.id < qid)
                  .order_by(Message.id.desc()).limit(context))
        lines = [_line(r) for r in (await session.execute(before)).all()][::-1]
        items.append(QueueItem(fid, voter, chan, _aware(created), correction or "", aid, atext,
                               adapter, qtext, conv, lines))
    return items


async def revise_pending(session: AsyncSession, *, feedback_id: int, text: str) -> bool:
    """Replace a pending correction's text (a reviewer's edit before approving it); a new
    revision. False if no pending correction has this id. Commits."""
    if not text.strip():
        raise ValueError("a correction needs text")
    result = await session.execute(
        update(Feedback).where(Feedback.id == feedback_id, _pending())
        .values(correction=text, updated_at=utcnow(), revision=Feedback.revision + 1))
    await session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


# ---- conversations ----


@dataclass(frozen=True, slots=True)
class Filters:
    text: str = ""
    person: str = ""
    channel: str = ""
    adapter: str = ""
    rating: int | None = None  # +1 / -1: conversations with an answer rated so
    since: date | None = None
    until: date | None = None  # inclusive

    def any(self) -> bool:
        return bool(self.text or self.person or self.channel or self.adapter
                    or self.rating is not None or self.since or self.until)


@dataclass(frozen=True, slots=True)
class Summary:
    id: int
    channel: str
    chat_id: str
    created_at: datetime
    messages: int
    last_at: datetime
    first_question: str
    up: int
    down: int
    corrections: int


def _day_start(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def search_conversations(session: AsyncSession, filters: Filters, *, limit: int = 50,
                               before: int | None = None) -> list[Summary]:
    """Conversations with a message matching every filter, newest first (`before`: only
    ids below it, the next page)."""
    stmt: Select[Any]
    on_messages = filters.text or filters.person or filters.adapter or filters.rating
    if on_messages or filters.since or filters.until:
        m = Message
        where = []
        if filters.text:
            where.append(func.lower(m.text).like(_like(filters.text.lower()), escape="\\"))
        if filters.person:
            where.append(m.author_id == filters.person)
        if filters.adapter:
            where.append(m.adapter.is_(None) if filters.adapter == "base"
                         else m.adapter == filters.adapter)
            where.append(m.role == Role.ASSISTANT)
        if filters.rating is not None:
            where.append(exists().where(Feedback.answer_id == m.id,
                                        Feedback.rating == filters.rating))
        if filters.since:
            where.append(m.created_at >= _day_start(filters.since))
        if filters.until:
            end = _day_start(filters.until) + timedelta(days=1)
            where.append(m.created_at < end)
            # a message is never older than its conversation: the newest-first walk down
            # the conversation ids starts at the last conversation begun before the range
            # ended (an hour's leeway for clocks), not at the newest of all
            where.append(m.conversation_id <= select(func.max(Conversation.id)).where(
                Conversation.created_at < end + timedelta(hours=1)).scalar_subquery())
        stmt = select(m.conversation_id).where(*where).group_by(m.conversation_id)
        if filters.channel:
            stmt = stmt.join(Conversation, Conversation.id == m.conversation_id).where(
                Conversation.channel == filters.channel)
        if before is not None:
            stmt = stmt.where(m.conversation_id < before)
        stmt = stmt.order_by(m.conversation_id.desc()).limit(limit)
    else:
        stmt = select(Conversation.id).order_by(Conversation.id.desc()).limit(limit)
        if filters.channel:
            stmt = stmt.where(Conversation.channel == filters.channel)
        if before is not None:
            stmt = stmt.where(Conversation.id < before)
    ids = list((await session.execute(stmt)).scalars())
    return await summaries(session, ids)


async def summaries(session: AsyncSession, ids: Collection[int]) -> list[Summary]:
    """These conversations' summaries, in the order of `ids`."""
    if not ids:
        return []
    ids = list(ids)
    convs = {c.id: c for c in (await session.execute(
        select(Conversation).where(Conversation.id.in_(ids)))).scalars()}
    counts = {cid: (int(n), _aware(last), first) for cid, n, last, first in (
        await session.execute(
            select(Message.conversation_id, func.count(), func.max(Message.created_at),
                   func.min(case((Message.role == Role.USER, Message.id))))
            .where(Message.conversation_id.in_(ids)).group_by(Message.conversation_id))).all()}
    firsts = [f for _, _, f in counts.values() if f is not None]
    texts = dict((await session.execute(
        select(Message.id, Message.text).where(Message.id.in_(firsts)))).all()) if firsts else {}
    votes = {cid: (int(up or 0), int(down or 0), int(corr or 0)) for cid, up, down, corr in (
        await session.execute(
            select(Message.conversation_id,
                   func.sum(case((Feedback.rating == 1, 1), else_=0)),
                   func.sum(case((Feedback.rating == -1, 1), else_=0)),
                   func.sum(case((Feedback.correction.is_not(None), 1), else_=0)))
            .join(Feedback, Feedback.answer_id == Message.id)
            .where(Message.conversation_id.in_(ids))
            .group_by(Message.conversation_id))).all()}
    out = []
    for cid in ids:
        c = convs.get(cid)
        if c is None:
            continue
        n, last, first = counts.get(cid, (0, _aware(c.created_at), None))
        up, down, corr = votes.get(cid, (0, 0, 0))
        out.append(Summary(cid, c.channel, c.external_chat_id, _aware(c.created_at), n, last,
                           texts.get(first, "") if first else "", up, down, corr))
    return out


@dataclass(frozen=True, slots=True)
class FeedbackLine:
    id: int
    answer_id: int
    voter_id: str
    rating: int | None
    correction: str | None
    trusted: bool
    review_status: str | None
    source: str
    updated_at: datetime


@dataclass
class Thread:
    conversation: Conversation
    messages: list[Line]
    feedback: dict[int, list[FeedbackLine]]  # by answer id


async def thread(session: AsyncSession, conversation_id: int, *, limit: int = 500
                 ) -> Thread | None:
    """A conversation with its (last `limit`) messages and every answer's feedback."""
    conv = await session.get(Conversation, conversation_id)
    if conv is None:
        return None
    stmt = (select(*_LINE).where(Message.conversation_id == conversation_id)
            .order_by(Message.id.desc()).limit(limit))
    lines = [_line(r) for r in (await session.execute(stmt)).all()][::-1]
    answers = [m.id for m in lines if m.role == Role.ASSISTANT]
    feedback: dict[int, list[FeedbackLine]] = defaultdict(list)
    if answers:
        f = Feedback
        rows = await session.execute(
            select(f.id, f.answer_id, f.voter_id, f.rating, f.correction, f.trusted,
                   f.review_status, f.source, f.updated_at)
            .where(f.answer_id.in_(answers)).order_by(f.id))
        for row in rows.all():
            feedback[row[1]].append(FeedbackLine(*row[:5], bool(row[5]), row[6], row[7],
                                                 _aware(row[8])))
    return Thread(conv, lines, dict(feedback))


async def answer_channel(session: AsyncSession, answer_id: int) -> str | None:
    """The channel of the conversation holding this answer (None: no such answer)."""
    stmt = (select(Conversation.channel).join(Message, Message.conversation_id == Conversation.id)
            .where(Message.id == answer_id, Message.role == Role.ASSISTANT))
    return (await session.execute(stmt)).scalar_one_or_none()


# ---- quality ----

# The quality page counts answers and votes per day from a roll-up (model QualityDay): one
# row per closed UTC day, computed once and recomputed when stale, plus a live count of the
# days not yet closed. A day is closed once it ended ROLLUP_MARGIN ago; a change stamped
# within ROLLUP_MARGIN of a computation is looked at again (writes commit well within it).
# A closed day is stale when a vote on one of its answers changed since it was computed
# (feedback.updated_at), after any forget or retention deletion, and (one day per request)
# when computed more than ROLLUP_MAX_AGE ago, which bounds how long a write made outside
# storage's functions stays unseen.
ROLLUP_MARGIN = timedelta(minutes=10)
ROLLUP_MAX_AGE = timedelta(hours=6)


def _utc_day(session: AsyncSession, column: Any) -> Any:
    if _postgres(session):
        return func.date(func.timezone("UTC", column))
    return func.date(column)  # SQLite stores naive UTC


def _as_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


@dataclass(frozen=True, slots=True)
class Count:
    """One day's answers of one channel, adapter (None: the base model), status and failure
    kind (failed answers only), with the 👍 and 👎 on them."""

    channel: str
    adapter: str | None
    status: str | None
    error_kind: str | None
    answers: int
    up: int
    down: int


async def _count(session: AsyncSession, start: datetime, end: datetime | None
                 ) -> dict[date, list[Count]]:
    """Count the answers created in [start, end) per UTC day: one pass over the answers by
    time (the partial index), each answer's channel and votes looked up by key."""
    m = Message
    if _postgres(session):  # hundreds of thousands of cheap lookups estimated: JIT only costs
        await session.execute(text("SET LOCAL jit = off"))

    def votes(rating: int) -> Any:
        return (select(func.count()).where(Feedback.answer_id == m.id,
                                           Feedback.rating == rating).scalar_subquery())

    where = [m.role == Role.ASSISTANT, m.created_at >= start]
    if end is not None:
        where.append(m.created_at < end)
    answers = (select(_utc_day(session, m.created_at).label("day"),
                      select(Conversation.channel).where(Conversation.id == m.conversation_id)
                      .scalar_subquery().label("channel"),
                      m.adapter.label("adapter"), m.status.label("status"),
                      case((m.status == AnswerStatus.FAILED, m.error_kind)).label("kind"),
                      votes(1).label("up"), votes(-1).label("down"))
               .where(*where).subquery())
    a = answers.c
    keys = (a.day, a.channel, a.adapter, a.status, a.kind)
    stmt = select(*keys, func.count(), func.sum(a.up), func.sum(a.down)).group_by(*keys)
    out: dict[date, list[Count]] = defaultdict(list)
    for d, channel, adapter, status, kind, n, up, down in (await session.execute(stmt)).all():
        out[_as_date(d)].append(Count(channel or "", adapter, status, kind, int(n),
                                      int(up or 0), int(down or 0)))
    return out


async def _stale_days(session: AsyncSession, stored: dict[date, QualityDay], now: datetime
                      ) -> set[date]:
    computed = {d: _aware(row.computed_at) for d, row in stored.items()}
    if not computed:
        return set()
    stale: set[date] = set()
    since = min(computed.values()) - ROLLUP_MARGIN
    day = _utc_day(session, Message.created_at)
    first, last = min(computed), max(computed)
    changed = (select(day, func.max(Feedback.updated_at))
               .join(Message, Message.id == Feedback.answer_id)
               .where(Feedback.updated_at >= since,
                      Message.created_at >= _day_start(first),
                      Message.created_at < _day_start(last) + timedelta(days=1))
               .group_by(day))
    for d, at in (await session.execute(changed)).all():
        d = _as_date(d)
        if d in computed and _aware(at) >= computed[d] - ROLLUP_MARGIN:
            stale.add(d)
    erased = (await session.execute(select(func.max(AuditLog.at)).where(
        AuditLog.action.in_(ERASURES), AuditLog.at >= since))).scalar()
    if erased is not None:
        stale.update(d for d, at in computed.items() if _aware(erased) >= at - ROLLUP_MARGIN)
    aged = sorted((at, d) for d, at in computed.items()
                  if d not in stale and now - at > ROLLUP_MAX_AGE)
    stale.update(d for _, d in aged[:1])
    return stale


async def quality_counts(session: AsyncSession, *, first: date, now: datetime | None = None
                         ) -> dict[date, list[Count]]:
    """Answers and votes per day from `first` (UTC) to now: closed days from the roll-up
    (stale or missing ones recomputed and stored, committed), the rest counted live."""
    now = now or utcnow()
    live = (now - ROLLUP_MARGIN).date()
    stored = {_as_date(row.day): row for row in (await session.execute(
        select(QualityDay).where(QualityDay.day >= first, QualityDay.day < live))).scalars()}
    closed = {first + timedelta(days=i) for i in range(max(0, (live - first).days))}
    stale = (closed - set(stored)) | await _stale_days(session, stored, now)
    counts = {d: [Count(*c) for c in row.counts] for d, row in stored.items()
              if d not in stale}
    if stale:
        fresh = await _count(session, _day_start(min(stale)),
                             _day_start(max(stale)) + timedelta(days=1))
        for d in stale:
            counts[d] = fresh.get(d, [])
        try:
            await session.execute(delete(QualityDay).where(QualityDay.day.in_(stale)))
            session.add_all(QualityDay(day=d, computed_at=now,
                                       counts=[list(astuple(c)) for c in counts[d]])
                            for d in stale)
            await session.commit()
        except IntegrityError:  # another gateway stored the same days meanwhile
            await session.rollback()
    counts.update(await _count(session, _day_start(max(live, first)), None))
    return counts


@dataclass(frozen=True, slots=True)
class DayRating:
    day: date
    key: str  # adapter name ("base" for the base model) or channel
    up: int
    down: int


def ratings_by_day(counts: dict[date, list[Count]]
                   ) -> tuple[list[DayRating], list[DayRating]]:
    """👍 and 👎 per day of the answer: (per adapter, "base" for the base model; per
    channel); only keys with votes that day."""
    by: tuple[dict[tuple[date, str], list[int]], ...] = (defaultdict(lambda: [0, 0]),
                                                          defaultdict(lambda: [0, 0]))
    for d, rows in counts.items():
        for c in rows:
            if not c.up + c.down:
                continue
            for table, key in zip(by, ("base" if c.adapter is None else c.adapter, c.channel),
                                  strict=True):
                votes = table[(d, key)]
                votes[0] += c.up
                votes[1] += c.down
    return tuple([DayRating(d, k, u, n) for (d, k), (u, n) in sorted(table.items())]
                 for table in by)  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Volume:
    day: date
    answers: int
    failed: int


def answer_volume(counts: dict[date, list[Count]]) -> tuple[list[Volume], dict[str, int]]:
    """Answers (and failed ones) per day with any, and failures by kind."""
    per_day: dict[date, list[int]] = defaultdict(lambda: [0, 0])
    kinds: dict[str, int] = defaultdict(int)
    for d, rows in counts.items():
        for c in rows:
            day = per_day[d]
            day[0] += c.answers
            if c.status == AnswerStatus.FAILED:
                day[1] += c.answers
                kinds[c.error_kind or "unknown"] += c.answers
    return [Volume(d, a, f) for d, (a, f) in sorted(per_day.items())], dict(kinds)


@dataclass(frozen=True, slots=True)
class Percentiles:
    n: int
    p50: float | None
    p99: float | None


async def percentiles(session: AsyncSession, *columns: Any, since: datetime
                      ) -> list[Percentiles]:
    """p50 and p99 of answer columns (ttft_ms, latency_ms) over successful answers, in one
    scan on PostgreSQL."""
    where = (Message.created_at >= since, Message.role == Role.ASSISTANT,
             Message.status == AnswerStatus.OK)
    if _postgres(session):
        aggregates = []
        for column in columns:
            aggregates += [func.count(column), func.percentile_cont(0.5).within_group(column),
                           func.percentile_cont(0.99).within_group(column)]
        row = (await session.execute(select(*aggregates).where(*where))).one()
        return [Percentiles(int(row[3 * i] or 0), row[3 * i + 1], row[3 * i + 2])
                for i in range(len(columns))]
    out = []
    for column in columns:
        values = list((await session.execute(
            select(column).where(*where, column.is_not(None)).order_by(column))).scalars())
        out.append(_percentiles(values))
    return out


def _percentiles(values: list[float]) -> Percentiles:
    if not values:
        return Percentiles(0, None, None)

    def at(q: float) -> float:  # linear interpolation, as percentile_cont
        pos = q * (len(values) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(values) - 1)
        return float(values[lo] + (values[hi] - values[lo]) * (pos - lo))

    return Percentiles(len(values), at(0.5), at(0.99))


# ---- training ----


async def run_roles(session: AsyncSession, run_ids: Collection[int]) -> dict[int, dict[str, int]]:
    """Per run: how many feedback revisions it read in each role (trained, heldout, ...)."""
    if not run_ids:
        return {}
    stmt = (select(RunFeedback.run_id, RunFeedback.role, func.count())
            .where(RunFeedback.run_id.in_(list(run_ids)))
            .group_by(RunFeedback.run_id, RunFeedback.role))
    out: dict[int, dict[str, int]] = defaultdict(dict)
    for run_id, role, n in (await session.execute(stmt)).all():
        out[run_id][role] = int(n)
    return dict(out)
