"""The hand-off desk: a person takes a conversation over and the bot steps back.

A user asks for a person (a button, `/human`, a trigger phrase, or N 👎 in a conversation);
the hand-off is stored `waiting`, and from then on every replica's turn path finds it in the
database and passes the user's messages on to the agents (`Outcome.RELAYED`) instead of
answering. An agent takes it over (`held`); their messages are relayed to the user, and while
they answer the question the bot last answered, they form a preference pair on that answer
(chosen: the agent's words, rejected: the bot's; feedback of source `handoff`, trusted when
the agent is a reviewer, else awaiting review). Hand-back (a button, `/done`, or
`idle_s` without agent messages) returns the conversation to the bot. Where the agents work
is the channel's business (bots/<channel>/handoff.py); this desk keeps the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bots.core.types import (
    HandoffView,
    InboundMessage,
    Outcome,
    Relay,
    ReplySink,
    TurnResult,
)
from chatloop.telemetry import metrics
from storage import conversations, events
from storage import handoff as store
from storage.models import Handoff, utcnow

log = logging.getLogger(__name__)

DEFAULT_PHRASES = ("talk to a person", "talk to a human", "speak to a person",
                   "speak to a human", "human agent", "real person", "live agent")
ALREADY = "A person has been asked already and will answer here."
TAKEN = "{name} from the team is here and will answer you now."
BACK = "The person has left the conversation; I am answering again. Ask me anything."
LATE = "Sorry for the wait: everyone is still busy. A person will answer here as soon as they can."
NOBODY = "There is no one to hand this conversation to here; I will keep answering."
_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_HOURS = re.compile(
    r"^\s*(\w{3})(?:\s*-\s*(\w{3}))?\s+(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True, slots=True)
class SupportHours:
    """When people are there: days of the week (0 = Monday) and a daily window, in `tz`."""

    days: frozenset[int]
    start: time
    end: time
    tz: str = "UTC"

    @classmethod
    def parse(cls, spec: str, tz: str = "UTC") -> SupportHours:
        """`Mon-Fri 09:00-17:00` (or `Sat 10:00-14:00`); ValueError otherwise."""
        m = _HOURS.match(spec.lower())
        if m is None or m.group(1) not in _DAYS or (m.group(2) and m.group(2) not in _DAYS):
            raise ValueError(f"support hours must look like 'Mon-Fri 09:00-17:00', not {spec!r}")
        first = _DAYS.index(m.group(1))
        last = _DAYS.index(m.group(2)) if m.group(2) else first
        days = frozenset(d % 7 for d in range(first, first + (last - first) % 7 + 1))
        start, end = time(int(m.group(3)), int(m.group(4))), time(int(m.group(5)), int(m.group(6)))
        if end <= start:
            raise ValueError(f"support hours end before they start: {spec!r}")
        ZoneInfo(tz)  # an unknown zone fails here, at start-up
        return cls(days, start, end, tz)

    def is_open(self, now: datetime) -> bool:
        local = now.astimezone(ZoneInfo(self.tz))
        return local.weekday() in self.days and self.start <= local.time() < self.end

    def next_open(self, now: datetime) -> datetime:
        """When people are next there (local time of the hours' zone)."""
        local = now.astimezone(ZoneInfo(self.tz))
        for ahead in range(8):
            day = (local + timedelta(days=ahead)).date()
            opening = datetime.combine(day, self.start, ZoneInfo(self.tz))
            if day.weekday() in self.days and opening > local:
                return opening
        return local


@dataclass(frozen=True, slots=True)
class HandoffPolicy:
    """Where a person can take over, and the desk's timers (chatloop.settings.HandoffSettings)."""

    channels: frozenset[str] = frozenset()  # channels with a place for agents
    phrases: tuple[str, ...] = DEFAULT_PHRASES
    after_downvotes: int = 0  # 0: off
    idle_s: float = 1800.0
    wait_s: float = 600.0
    hours: SupportHours | None = None
    ticket_url: str | None = None
    expected_wait: str = "a few minutes"
    _phrases: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_phrases", tuple(_norm(p) for p in self.phrases if p.strip()))

    def wants_person(self, text: str) -> bool:
        said = _norm(text)
        return any(p in said for p in self._phrases)


class Links:
    """Escalations this process is posting and linking to their agents' thread (a forum
    topic, a Slack thread). An agent may write there the moment the thread appears, before
    the link is committed: a lookup that finds no hand-off while links are under way waits
    for them and looks again, instead of taking the thread for the agents' own."""

    def __init__(self) -> None:
        self._pending = self._done = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def linking(self) -> AsyncIterator[None]:
        """Around creating an escalation's thread and storing it on the hand-off."""
        self._pending += 1
        try:
            yield
        finally:
            self._pending -= 1
            self._done += 1
            async with self._changed:
                self._changed.notify_all()

    async def find(self, lookup: Callable[[], Awaitable[HandoffView | None]]
                   ) -> HandoffView | None:
        """`lookup()`, looked at again after each link finished meanwhile."""
        while True:
            done, pending = self._done, self._pending
            found = await lookup()
            if found is not None or not pending:
                return found
            async with self._changed:
                await self._changed.wait_for(lambda done=done: self._done != done)


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower()))


def view(row: Handoff, *, new: bool = False) -> HandoffView:
    assert row.id is not None
    return HandoffView(
        id=row.id, conversation_id=row.conversation_id, channel=row.channel,
        chat_id=row.chat_id, thread_id=row.thread_id, user_id=row.user_id, status=row.status,
        reason=row.reason, agent_chat=row.agent_chat, agent_ref=row.agent_ref,
        agent_id=row.agent_id, agent_name=row.agent_name, new=new)


class HandoffDesk:
    """Hand-off state for every channel; the database is the only shared state."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], policy: HandoffPolicy,
                 *, trusted: Callable[[str], bool], clock: Callable[[], datetime] = utcnow
                 ) -> None:
        self._sessions, self.policy, self._trusted, self._clock = sessions, policy, trusted, clock

    def serves(self, channel: str) -> bool:
        """Whether a person can take conversations over in `channel`."""
        return channel in self.policy.channels

    def wants_person(self, msg: InboundMessage, text: str) -> bool:
        return self.serves(msg.channel) and self.policy.wants_person(text)

    def requested_text(self) -> str:
        """What the user is told on asking: a person will answer, and roughly when."""
        now, hours = self._clock(), self.policy.hours
        if hours is not None and not hours.is_open(now):
            at = hours.next_open(now)
            return ("I have asked for a person. No one from the team is there right now; "
                    f"they will answer here from {at:%A %H:%M} ({hours.tz}).")
        return ("I have asked for a person: someone from the team will answer here, usually "
                f"within {self.policy.expected_wait}. I will stay quiet until then.")

    def late_text(self) -> str:
        url = self.policy.ticket_url
        return LATE + (f" You can also open a ticket: {url}" if url else "")

    # -- the user's side (called by ConversationCore) -------------------------------------------

    async def request(self, msg: InboundMessage, sink: ReplySink, *, reason: str) -> TurnResult:
        """Open a hand-off for the message's conversation (its delivery recorded once) and
        tell the user; the result's `handoff.new` asks the channel to post the escalation."""
        if not self.serves(msg.channel):
            if await self._first(msg):
                await sink.notice(NOBODY)
            return TurnResult(Outcome.REJECTED)
        if not await self._first(msg):
            return TurnResult(Outcome.DUPLICATE)
        async with self._sessions() as s:
            conv = await conversations.current_conversation(
                s, channel=msg.channel, chat_id=msg.chat_id, thread_id=msg.thread_id)
            row, new = await store.request(s, conversation_id=conv, channel=msg.channel,
                                           chat_id=msg.chat_id, thread_id=msg.thread_id,
                                           user_id=msg.author, reason=reason)
        if new:
            metrics.HANDOFFS.labels(msg.channel, reason, row.adapter or "base").inc()
            log.info("hand-off %s requested in conversation %s (%s)", row.id, conv, reason)
        await sink.notice(self.requested_text() if new else ALREADY)
        return TurnResult(Outcome.ESCALATED, handoff=view(row, new=new))

    async def after_downvote(self, *, answer_id: int, voter_id: str) -> HandoffView | None:
        """`policy.after_downvotes` 👎 of one user in a conversation ask for a person: the new
        hand-off (the channel tells the user and posts the escalation), else None."""
        if self.policy.after_downvotes <= 0:
            return None
        async with self._sessions() as s:
            found = await store.downvotes(s, answer_id=answer_id, voter_id=voter_id)
            if found is None or found[1] < self.policy.after_downvotes or not self.serves(
                    found[0].channel):
                return None
            conv = found[0]
            row, new = await store.request(
                s, conversation_id=conv.id or 0, channel=conv.channel,
                chat_id=conv.external_chat_id, thread_id=conv.external_thread_id,
                user_id=voter_id, reason="downvotes")
        if not new:
            return None
        metrics.HANDOFFS.labels(conv.channel, "downvotes", row.adapter or "base").inc()
        log.info("hand-off %s requested in conversation %s (downvotes)", row.id, conv.id)
        return view(row, new=True)

    async def intercept(self, msg: InboundMessage, text: str) -> TurnResult | None:
        """A message in a conversation a person holds or waits for: stored to be relayed to
        the agents (RELAYED), or, from the agent holding it (Slack: in the user's own
        thread), noted as theirs; None when the bot should answer."""
        async with self._sessions() as s:
            conv = await conversations.find_conversation(
                s, channel=msg.channel, chat_id=msg.chat_id, thread_id=msg.thread_id)
            row = await store.open_in(s, conversation_id=conv, channel=msg.channel,
                                      chat_id=msg.chat_id, user_id=msg.author)
            if row is None:
                return None
            if msg.author == row.agent_id:
                relay = await self._agent_wrote(s, row, msg.author, row.agent_name or "", text,
                                                (msg.channel, msg.event_id), visible=True)
                outcome = Outcome.RELAYED if relay is not None else Outcome.DUPLICATE
                return TurnResult(outcome, handoff=view(row))
            stored = await store.add_message(s, handoff_id=row.id or 0, direction="in",
                                             author_id=msg.author, text=text,
                                             delivery=(msg.channel, msg.event_id))
            if stored is None:
                return TurnResult(Outcome.DUPLICATE)
            await store.user_wrote(s, handoff_id=row.id or 0)
        return TurnResult(Outcome.RELAYED, handoff=view(row),
                          relay=Relay(view(row), stored[0], text, msg.author))

    # -- the agents' side (called by channels) ---------------------------------------------------

    async def find(self, handoff_id: int) -> HandoffView | None:
        async with self._sessions() as s:
            row = await store.get(s, handoff_id=handoff_id)
        return None if row is None else view(row)

    async def by_agent_ref(self, agent_chat: str, agent_ref: str) -> HandoffView | None:
        async with self._sessions() as s:
            row = await store.by_agent_ref(s, agent_chat=agent_chat, agent_ref=agent_ref)
        return None if row is None else view(row)

    async def escalated(self, handoff_id: int, *, agent_chat: str, agent_ref: str) -> None:
        """The escalation is posted at `agent_ref` in `agent_chat`: agents' replies there
        find the hand-off."""
        async with self._sessions() as s:
            await store.set_agent_ref(s, handoff_id=handoff_id, agent_chat=agent_chat,
                                      agent_ref=agent_ref)

    async def take(self, handoff_id: int, *, agent: str, name: str) -> HandoffView | None:
        """`agent` takes the conversation over; None if it was handed back already."""
        async with self._sessions() as s:
            row = await store.take(s, handoff_id=handoff_id, agent_id=agent, agent_name=name)
        if row is not None:
            log.info("hand-off %s held by an agent", handoff_id)
        return None if row is None else view(row)

    async def hand_back(self, handoff_id: int, *, by: str) -> HandoffView | None:
        """Return the conversation to the bot; None if it was handed back already (by another
        replica, a timer or another agent): tell the user only once."""
        async with self._sessions() as s:
            if not await store.close(s, handoff_id=handoff_id, by=by):
                return None
            row = await store.get(s, handoff_id=handoff_id)
        log.info("hand-off %s handed back (%s)", handoff_id, by.split(":", 1)[0])
        return None if row is None else view(row)

    async def agent_message(self, handoff_id: int, *, agent: str, name: str, text: str,
                            delivery: tuple[str, str]) -> Relay | None:
        """An agent's message for the user: takes a waiting hand-off over, is stored (with its
        delivery, once) and joins the preference pair; the Relay to send, or None if it was
        relayed before or the hand-off is closed."""
        async with self._sessions() as s:
            row = await store.get(s, handoff_id=handoff_id)
            if row is None or row.status == "closed":
                return None
            if row.agent_id != agent:
                row = await store.take(s, handoff_id=handoff_id, agent_id=agent,
                                       agent_name=name) or row
            return await self._agent_wrote(s, row, agent, name, text, delivery, visible=False)

    async def _agent_wrote(self, s: AsyncSession, row: Handoff, agent: str, name: str,
                           text: str, delivery: tuple[str, str], *, visible: bool
                           ) -> Relay | None:
        found = view(row)  # as it is now: the commits below may expire the row
        stored = await store.add_message(s, handoff_id=row.id or 0, direction="out",
                                         author_id=agent, text=text, delivery=delivery)
        if stored is None:
            return None
        message_id, fresh = stored
        if fresh:
            await store.agent_wrote(s, handoff=row, agent_id=agent, text=text,
                                    trusted=self._trusted(agent))
        if visible:  # written where the user reads it: nothing to relay
            await store.mark_message(s, message_id=message_id)
        return Relay(found, message_id, text, agent)

    async def delivered(self, message_id: int, *, error: str | None = None) -> None:
        """A relayed message arrived (or failed for good: `error`, e.g. `telegram:blocked`)."""
        async with self._sessions() as s:
            await store.mark_message(s, message_id=message_id, error=error)

    async def failed(self, handoff_id: int, error: str) -> None:
        """The agents' side or the user's cannot be reached: stored on the hand-off."""
        async with self._sessions() as s:
            await store.set_error(s, handoff_id=handoff_id, error=error)
        log.warning("hand-off %s: %s", handoff_id, error)

    async def pending(self, handoff_id: int, direction: str = "in") -> list[Relay]:
        """Stored messages not yet relayed (after the agents' side was re-created)."""
        async with self._sessions() as s:
            row = await store.get(s, handoff_id=handoff_id)
            if row is None:
                return []
            left = await store.undelivered(s, handoff_id=handoff_id, direction=direction)
        return [Relay(view(row), m.id or 0, m.text, m.author_id) for m in left]

    async def outbox(self, *, channel: str, chat_id: str, user: str
                     ) -> tuple[HandoffView | None, list[Relay]]:
        """For a channel that polls (the web chat): the user's newest hand-off in the chat and
        the agents' messages not yet shown, marked delivered as they are returned."""
        async with self._sessions() as s:
            row = await store.latest_in(s, channel=channel, chat_id=chat_id, user_id=user)
            if row is None or row.id is None:
                return None, []
            found = view(row)
            left = [Relay(found, m.id or 0, m.text, m.author_id)
                    for m in await store.undelivered(s, handoff_id=row.id, direction="out")]
            for relay in left:
                await store.mark_message(s, message_id=relay.message_id)
        return found, left

    async def messages(self, handoff_id: int) -> list[tuple[str, str, str]]:
        """Every message relayed in the hand-off: (direction, author, text), in order."""
        async with self._sessions() as s:
            return [(m.direction, m.author_id, m.text)
                    for m in await store.messages(s, handoff_id=handoff_id)]

    async def transcript(self, handoff: HandoffView, limit: int = 10) -> list[tuple[str, str]]:
        async with self._sessions() as s:
            return await store.transcript(s, conversation_id=handoff.conversation_id,
                                          limit=limit)

    async def inbox(self, channels: Collection[str] = ()) -> list[HandoffView]:
        """Open hand-offs, oldest first (of `channels`, or all)."""
        async with self._sessions() as s:
            rows = await store.listing(s)
        return [view(r) for r in rows if not channels or r.channel in channels]

    async def due(self, channel: str) -> list[tuple[HandoffView, str]]:
        """Hand-offs whose timer ran out, each claimed by this replica alone: ("idle", h):
        handed back after `idle_s` without agent messages (tell the user and the agents);
        ("late", h): waiting longer than `wait_s` (apologise once)."""
        async with self._sessions() as s:
            idle = await store.claim_idle(s, channel=channel, idle_s=self.policy.idle_s)
            late = await store.claim_waiting(s, channel=channel, wait_s=self.policy.wait_s)
        return [(view(h), "idle") for h in idle] + [(view(h), "late") for h in late]

    async def _first(self, msg: InboundMessage) -> bool:
        async with self._sessions() as s:
            return await events.record_event(s, channel=msg.channel,
                                             event_id=msg.event_id) is not None
