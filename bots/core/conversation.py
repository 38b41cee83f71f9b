"""`ConversationCore`: the one way channels reach conversations, answers and feedback."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Collection

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bots.core import payload
from bots.core.feedback import FeedbackDesk
from bots.core.handoff import HandoffDesk, HandoffPolicy
from bots.core.leases import Leases
from bots.core.memory import AnswerMemory
from bots.core.recovery import Recovery
from bots.core.turns import Turns
from bots.core.types import (
    Accepted,
    CoreLimits,
    FeedbackResult,
    InboundMessage,
    Outcome,
    ReplySink,
    Router,
    SinkFor,
    StaticRouter,
    TurnResult,
    clean_text,
    default_owner,
)
from bots.limits import KeyedLocks, RateLimiter
from chatloop.telemetry import hooks
from inference.base import InferenceBackend
from inference.prompt import PromptFitter
from storage import conversations, events
from storage.feedback import Delivery
from storage.sql import turn_engine

log = logging.getLogger(__name__)

HELP_TEXT = (
    "Ask me a question and I will answer. Rate answers with 👍 / 👎, and suggest a better "
    "answer when mine is wrong: that is how I learn.\n"
    "Commands: /reset starts a new conversation, /help shows this message."
)


class ConversationCore:
    """Runs turns for every channel; stateless apart from in-process limits and locks."""

    def __init__(self, *, sessions: async_sessionmaker[AsyncSession], backend: InferenceBackend,
                 fitter: PromptFitter, system_prompt: str, limits: CoreLimits,
                 router: Router | None = None, reviewers: Collection[str] = frozenset(),
                 owner: str | None = None, memory: AnswerMemory | None = None,
                 handoff: HandoffPolicy | None = None) -> None:
        """`reviewers`: identities (`channel:id`) whose feedback is trusted; a web identity
        there is refused (ValueError): the web's reviewers are its authenticated operators."""
        self.sessions = sessions
        self._engine = turn_engine(sessions.kw["bind"])
        self._limits = limits
        self._rate = RateLimiter(per_minute=limits.rate_limit_per_minute)
        self._conversation_locks = KeyedLocks()
        self._leases = Leases(sessions, owner=owner or default_owner(),
                              lease_s=limits.event_lease_s)
        self._turns = Turns(engine=self._engine, sessions=sessions, backend=backend,
                            router=router or StaticRouter(), fitter=fitter,
                            system_prompt=system_prompt, limits=limits, memory=memory,
                            leases=self._leases)
        self._recovery = Recovery(sessions=sessions, turns=self._turns, leases=self._leases)
        self._feedback = FeedbackDesk(sessions, reviewers=reviewers)
        self.handoff = HandoffDesk(sessions, handoff or HandoffPolicy(),
                                   trusted=self._feedback.trusted)

    @property
    def backend(self) -> InferenceBackend:
        return self._turns.backend

    @property
    def memory(self) -> AnswerMemory | None:
        """The answer memory turns consult, if any."""
        return self._turns.memory

    @property
    def router(self) -> Router:
        return self._turns.router

    @property
    def owner(self) -> str:
        return self._leases.owner

    @property
    def reviewers(self) -> frozenset[str]:
        return self._feedback.reviewers

    def is_reviewer(self, who: str) -> bool:
        """Whether the identity `who` is a configured reviewer."""
        return self._feedback.trusted(who)

    # -- turns --------------------------------------------------------------------------------

    async def handle(self, msg: InboundMessage, sink: ReplySink) -> TurnResult:
        """Answer one inbound message exactly once, whatever the platform redelivers."""
        accepted = await self.accept(msg, sink)
        if isinstance(accepted, TurnResult):
            return accepted
        return await self.answer(accepted, sink)

    @hooks.accepting
    async def accept(self, msg: InboundMessage, sink: ReplySink) -> Accepted | TurnResult:
        """Record a question with its delivery id; channels that must acknowledge before
        answering (Slack) call this before the ack and `answer` after it.

        Commands, bad input, rate limits and duplicates end here (a TurnResult). A recorded
        question's redelivery is a duplicate, and a crash before its answer leaves it to
        `resume`.
        """
        text = msg.text.strip()
        if text.startswith("/"):
            return await self._command(msg, text, sink)
        if not text:
            return await self._reject(msg, sink, "Please send your question as text.")
        if len(text) > self._limits.max_input_chars:
            return await self._reject(
                msg, sink,
                f"That message is too long ({len(text)} characters; the limit is "
                f"{self._limits.max_input_chars}). Please shorten it.",
            )
        if not await self._rate.allow(msg.author):
            return await self._reject(
                msg, sink, "You are sending messages too quickly. Please wait a minute."
            )
        if self.handoff.serves(msg.channel):  # a person holds it, or is asked for: no answer
            if self.handoff.wants_person(msg, text):
                return await self.handoff.request(msg, sink, reason="phrase")
            held = await self.handoff.intercept(msg, text)
            if held is not None:
                return held
        try:
            async with self._engine.connect() as s:
                conv = await conversations.current_conversation(
                    s, channel=msg.channel, chat_id=msg.chat_id, thread_id=msg.thread_id)
                turn = await conversations.begin_turn(
                    s, channel=msg.channel, event_id=msg.event_id, conversation_id=conv,
                    text=text, author_id=msg.author, external_message_id=msg.message_id,
                    payload=payload.dump(msg), owner=self.owner,
                    lease_s=self._leases.lease_s,
                )
        except BaseException:  # not recorded: the platform's redelivery must not count twice
            with contextlib.suppress(Exception):
                await self._rate.refund(msg.author)
            raise
        if turn is None:
            log.info("duplicate %s event %s ignored", msg.channel, msg.event_id)
            return TurnResult(Outcome.DUPLICATE)
        self._leases.hold(turn.event_id)
        return Accepted(turn, text, (msg.channel, msg.chat_id, msg.thread_id))

    @hooks.answering
    async def answer(self, accepted: Accepted, sink: ReplySink) -> TurnResult:
        """Answer a question recorded by `accept`; one turn at a time per conversation, and
        each turn's history holds only the questions recorded before it."""
        async with self._leases.holding(accepted.turn.event_id), \
                self._conversation_locks.hold(accepted.key):
            return await self._turns.run(accepted.turn, accepted.question, sink)
        return TurnResult(Outcome.DUPLICATE)  # the lease was lost: another process answers it

    async def abandon(self, accepted: Accepted, why: str) -> None:
        """Close a turn nobody waits for any more (its answer task was cancelled first): the
        answer if stored is left undelivered, else the turn is stored as failed (`why`)."""
        await self._turns.close(accepted.turn, why)
        self._leases.release(accepted.turn.event_id)

    async def note_shown(self, event_id: int, ref: str) -> None:
        """A channel showing an answer as one growing message records it, so that the turn,
        resumed after a crash, continues that message instead of starting another."""
        async with self.sessions() as s:
            await events.note_shown(s, event_id=event_id, ref=ref)

    async def delivery_failed(self, answer_id: int, kind: str) -> None:
        """The platform refused an answer for good (kept, not retried): note why on it."""
        async with self.sessions() as s:
            await conversations.set_error_kind(s, message_id=answer_id, error_kind=kind)

    async def knows_thread(self, msg: InboundMessage) -> bool:
        """Whether the bot has a conversation in the message's thread (a follow-up)."""
        async with self.sessions() as s:
            return await conversations.find_conversation(
                s, channel=msg.channel, chat_id=msg.chat_id, thread_id=msg.thread_id
            ) is not None

    async def record_delivery(self, channel: str, event_id: str) -> bool:
        """Record a delivery that needs no turn and no feedback; False if seen before."""
        async with self.sessions() as s:
            return await events.record_event(s, channel=channel, event_id=event_id) is not None

    # -- recovery -----------------------------------------------------------------------------

    async def resume(self, channel: str, sink_for: SinkFor) -> int:
        """Finish what a crash or shutdown left open (see `Recovery.resume`)."""
        return await self._recovery.resume(channel, sink_for)

    async def resume_forever(self, channel: str, sink_for: SinkFor) -> None:
        await self._recovery.resume_forever(channel, sink_for)

    async def aclose(self) -> None:
        """Stop renewing leases and give up those still held (turns cut short by a shutdown)."""
        await self._leases.aclose()

    # -- feedback -----------------------------------------------------------------------------

    @hooks.feedback("vote")
    async def vote(self, *, answer_id: int, voter_id: str, rating: int, source: str,
                   reason: str | None = None, event_id: str | None = None,
                   operator: bool = False) -> FeedbackResult:
        """Store the vote of `voter_id` (an identity, `channel:id`); with `event_id`, its
        platform delivery too (one transaction). UnknownAnswer unless the answer is one this
        voter may rate (bots.core.feedback). `operator`: the channel authenticated the voter
        as one of its operators (trusted like a reviewer)."""
        result = await self._feedback.vote(answer_id=answer_id, voter_id=voter_id,
                                           rating=rating, source=source,
                                           reason=clean_text(reason) if reason else reason,
                                           delivery=_delivery(source, event_id),
                                           operator=operator)
        if rating < 0 and result.first_delivery:  # CHATLOOP_HANDOFF_AFTER_DOWNVOTES
            handoff = await self.handoff.after_downvote(answer_id=answer_id, voter_id=voter_id)
            if handoff is not None:
                result = dataclasses.replace(result, handoff=handoff)
        return result

    @hooks.feedback("correction")
    async def correct(self, *, answer_id: int, voter_id: str, text: str, source: str,
                      event_id: str | None = None, operator: bool = False) -> FeedbackResult:
        """Store a correction, as `vote` does a vote: untrusted ones await review."""
        return await self._feedback.correct(answer_id=answer_id, voter_id=voter_id,
                                            text=clean_text(text), source=source,
                                            delivery=_delivery(source, event_id),
                                            operator=operator)

    async def reviewer_reply(self, msg: InboundMessage, *, source: str) -> bool:
        return await self._feedback.reviewer_reply(msg, source=source)

    # -- commands and refusals ----------------------------------------------------------------

    async def _command(self, msg: InboundMessage, text: str, sink: ReplySink) -> TurnResult:
        name = text[1:].split(maxsplit=1)[0].split("@", 1)[0].lower() if len(text) > 1 else ""
        if name == "human":
            button = text.split()[1:2] == ["button"]  # the channels' "Talk to a person"
            return await self.handoff.request(msg, sink,
                                              reason="button" if button else "command")
        if name not in ("reset", "help", "start"):
            await sink.notice(f"Unknown command /{name}. " + HELP_TEXT.split("\n", 1)[1])
            return TurnResult(Outcome.REJECTED)
        async with self.sessions() as s:
            if await events.record_event(s, channel=msg.channel, event_id=msg.event_id) is None:
                return TurnResult(Outcome.DUPLICATE)
            if name == "reset":
                await conversations.reset_conversation(s, channel=msg.channel,
                                                       chat_id=msg.chat_id,
                                                       thread_id=msg.thread_id)
        await sink.notice("Started a new conversation." if name == "reset" else HELP_TEXT)
        return TurnResult(Outcome.COMMAND, text=name)

    async def _reject(self, msg: InboundMessage, sink: ReplySink, why: str) -> TurnResult:
        if not await self.record_delivery(msg.channel, msg.event_id):
            return TurnResult(Outcome.DUPLICATE)
        await sink.notice(why)
        return TurnResult(Outcome.REJECTED)


def _delivery(source: str, event_id: str | None) -> Delivery | None:
    return None if event_id is None else Delivery(source, event_id)
