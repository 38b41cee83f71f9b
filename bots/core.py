"""The channel-independent conversation core.

InboundMessage -> dedupe -> history -> prompt -> route -> stream into the
channel's ReplySink -> store the answer with its metadata -> feedback controls.
Every channel adapter (web chat, Telegram, Slack) calls `ConversationCore.handle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bots.limits import KeyedLocks, RateLimiter
from inference.base import ChatMessage, Finished, GenerationRequest, InferenceBackend
from inference.errors import AdapterNotFound, InferenceError
from inference.prompt import PromptFitter
from storage import repo
from storage.models import AnswerStatus, Role, utcnow

log = logging.getLogger(__name__)

HELP_TEXT = (
    "Ask me a question and I will answer. Rate answers with 👍 / 👎, and suggest a better "
    "answer when mine is wrong: that is how I learn.\n"
    "Commands: /reset starts a new conversation, /help shows this message."
)
APOLOGIES = {
    "unavailable": "Sorry, the assistant is unavailable right now. Please try again in a minute.",
    "rate_limited": "Sorry, the assistant is busy right now. Please try again shortly.",
    "context_too_long": "Sorry, that is too long for me to read. Please send a shorter message.",
}
APOLOGY = "Sorry, something went wrong while answering. Please try again."
MAX_RESUMES = 5  # a turn resumed this often without finishing is closed as failed


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A normalised message from any channel; `event_id` is the platform's delivery id."""

    channel: str
    event_id: str
    chat_id: str
    user_id: str
    text: str
    thread_id: str = ""
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Resumed:
    """What `resume` tells a channel about the turn it asks a sink for."""

    event_id: int
    shown_ref: str | None  # the message already showing the answer before a crash, if any


SinkFor = Callable[[InboundMessage, Resumed], Awaitable["ReplySink"]]


class ReplySink(Protocol):
    """How the core talks to one reply on one platform (streaming-aware)."""

    async def begin(self) -> None:
        """Show that an answer is coming (typing indicator, placeholder)."""

    async def update(self, text: str) -> None:
        """The answer so far (the whole text, not a delta); the sink throttles itself."""

    async def finish(self, text: str, answer_id: int) -> str | None:
        """Show the exact final text with feedback controls; return the platform message id."""

    async def fail(self, text: str) -> None:
        """Replace the reply in progress with a short apology."""

    async def notice(self, text: str) -> None:
        """Send a short message that is not an answer (help, limits, bad input)."""


class Router(Protocol):
    """Chooses the model route for a conversation: None is the base model, else an adapter."""

    async def route(self, conversation_id: int) -> str | None: ...


@dataclass(frozen=True, slots=True)
class StaticRouter:
    adapter: str | None = None

    async def route(self, conversation_id: int) -> str | None:
        return self.adapter


class Outcome(StrEnum):
    ANSWERED = "answered"
    FAILED = "failed"
    DUPLICATE = "duplicate"
    COMMAND = "command"
    REJECTED = "rejected"  # empty, oversized, rate-limited: told why, nothing generated


@dataclass(frozen=True, slots=True)
class TurnResult:
    outcome: Outcome
    answer_id: int | None = None
    text: str = ""
    error_kind: str | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    """A question recorded by `ConversationCore.accept`, waiting for `ConversationCore.answer`."""

    turn: repo.TurnStart
    question: str
    key: tuple[str, str, str]  # (channel, chat_id, thread_id): turns run in order per key


@dataclass(slots=True)
class _Progress:
    """One answer as it streams: what a failed turn still stores."""

    started: float
    adapter: str | None
    text: str = ""
    ttft_ms: float | None = None

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


@dataclass(frozen=True, slots=True)
class CoreLimits:
    max_input_chars: int = 4000
    max_tokens: int = 256
    history_messages: int = 20
    rate_limit_per_minute: int = 20
    max_concurrent_generations: int = 32
    event_lease_s: float = 30.0  # a crashed process's turns are resumed elsewhere after this


def default_owner() -> str:
    """This process, as the owner of the events it works on (host and process id)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class ConversationCore:
    """Runs turns for every channel; stateless apart from in-process limits and locks."""

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        backend: InferenceBackend,
        fitter: PromptFitter,
        system_prompt: str,
        limits: CoreLimits,
        router: Router | None = None,
        reviewer_ids: frozenset[str] = frozenset(),
        owner: str | None = None,
    ) -> None:
        self.sessions = sessions
        # the turn path (accept, history, store, deliver) runs on plain connections: an ORM
        # session's set-up and bookkeeping cost more than its few statements
        self._engine: AsyncEngine = repo.turn_engine(sessions.kw["bind"])
        self.backend = backend
        self.router: Router = router or StaticRouter()
        self.reviewer_ids = reviewer_ids
        self._fitter = fitter
        self._system_prompt = system_prompt
        self._limits = limits
        self._rate = RateLimiter(per_minute=limits.rate_limit_per_minute)
        self._generations = asyncio.Semaphore(limits.max_concurrent_generations)
        self._conversation_locks = KeyedLocks()
        # events this process works on: their leases are renewed until the turn ends, so
        # another replica's `resume` never takes a live turn but does take a crashed one's
        self.owner = owner or default_owner()
        self._held: set[int] = set()
        self._heartbeat: asyncio.Task[None] | None = None

    async def handle(self, msg: InboundMessage, sink: ReplySink) -> TurnResult:
        """Answer one inbound message exactly once, whatever the platform redelivers."""
        accepted = await self.accept(msg, sink)
        if isinstance(accepted, TurnResult):
            return accepted
        return await self.answer(accepted, sink)

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
        if not self._rate.allow(f"{msg.channel}:{msg.user_id}"):
            return await self._reject(
                msg, sink, "You are sending messages too quickly. Please wait a minute."
            )
        async with self._engine.connect() as s:
            conv = await repo.current_conversation(
                s, channel=msg.channel, chat_id=msg.chat_id, thread_id=msg.thread_id
            )
            turn = await repo.begin_turn(
                s, channel=msg.channel, event_id=msg.event_id, conversation_id=conv,
                text=text, author_id=msg.user_id, external_message_id=msg.message_id,
                payload=dataclasses.asdict(msg), owner=self.owner, lease_until=self._lease_end(),
            )
        if turn is None:
            log.info("duplicate %s event %s ignored", msg.channel, msg.event_id)
            return TurnResult(Outcome.DUPLICATE)
        self._hold(turn.event_id)
        return Accepted(turn, text, (msg.channel, msg.chat_id, msg.thread_id))

    async def answer(self, accepted: Accepted, sink: ReplySink) -> TurnResult:
        """Answer a question recorded by `accept`; one turn at a time per conversation, and
        each turn's history holds only the questions recorded before it."""
        async with self._holding(accepted.turn.event_id), \
                self._conversation_locks.hold(accepted.key):
            return await self.run_turn(accepted.turn, accepted.question, sink)

    async def note_shown(self, event_id: int, ref: str) -> None:
        """A channel showing an answer as one growing message records it, so that the turn,
        resumed after a crash, continues that message instead of starting another."""
        async with self.sessions() as s:
            await repo.note_shown(s, event_id=event_id, ref=ref)

    async def abandon(self, accepted: Accepted, why: str) -> None:
        """Close a turn nobody waits for any more (its answer task was cancelled first): the
        answer if stored is left undelivered, else the turn is stored as failed (`why`)."""
        await self._close(accepted.turn, why)
        self._release(accepted.turn.event_id)

    async def _close(self, turn: repo.TurnStart, why: str) -> None:
        async with self.sessions() as s:
            stored = await repo.stored_answer(s, question_id=turn.question_id)
            if stored is not None and stored.id is not None:
                await repo.mark_delivered(s, turn=turn, answer_id=stored.id,
                                          external_message_id=None)
            else:
                meta = repo.AnswerMeta(model=self.backend.model_name, adapter=None,
                                       error_kind=why)
                await repo.finish_turn(s, turn=turn, text="", status=AnswerStatus.FAILED,
                                       meta=meta)

    async def resume(self, channel: str, sink_for: SinkFor) -> int:
        """Finish what a crash or shutdown left open: generate the answers never stored and
        deliver the ones stored but not shown. Only events no live process holds are taken
        (each by one process: `repo.claim_event`). Returns how many events were resumed."""
        async with self.sessions() as s:
            pending = await repo.pending_events(s, channel=channel)
        resumed = 0
        for event in pending:
            if event.payload is None or event.message_id is None or event.id is None:
                continue
            async with self.sessions() as s:
                if not await repo.claim_event(s, event_id=event.id, owner=self.owner,
                                              lease_until=self._lease_end()):
                    continue  # another process took it meanwhile
                question = await repo.get_message(s, message_id=event.message_id)
                stored = await repo.stored_answer(s, question_id=event.message_id)
            assert question is not None
            turn = repo.TurnStart(question.conversation_id, event.message_id, event.id)
            if event.attempts >= MAX_RESUMES:  # this claim would be one more: it keeps failing
                log.error("%s event %s failed %s resumes: given up", channel,
                          event.external_event_id, event.attempts)
                await self._close(turn, "gave_up")
                continue
            self._hold(event.id)
            async with self._holding(event.id):
                msg = InboundMessage(**event.payload)
                log.info("resuming %s event %s", channel, event.external_event_id)
                sink = await sink_for(msg, Resumed(event.id, event.shown_ref))
                if stored is not None and stored.id is not None:
                    await self._deliver(turn, stored.id, stored.text, sink)
                else:
                    await self.run_turn(turn, question.text, sink)
            resumed += 1
        return resumed

    async def resume_forever(self, channel: str, sink_for: SinkFor) -> None:
        """Resume, every lease period, what crashed processes (other replicas) left open."""
        while True:
            await asyncio.sleep(self._limits.event_lease_s)
            try:
                if resumed := await self.resume(channel, sink_for):
                    log.info("answered %s %s events another process left open", resumed,
                             channel)
            except Exception:  # the database may be away for a while: try again later
                log.exception("resuming %s events failed", channel)

    async def aclose(self) -> None:
        """Stop renewing leases and give up those still held (turns cut short by a shutdown),
        so the next start resumes them at once instead of after the lease."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        if self._held:
            try:
                async with self.sessions() as s:
                    await repo.renew_leases(s, event_ids=self._held, owner=self.owner,
                                            lease_until=None)
            except Exception as exc:  # they are taken over when the leases run out instead
                log.warning("could not give up %s event leases: %s", len(self._held), exc)
            self._held.clear()

    def _lease_end(self) -> datetime:
        return utcnow() + timedelta(seconds=self._limits.event_lease_s)

    @contextlib.asynccontextmanager
    async def _holding(self, event_id: int) -> AsyncIterator[None]:
        """The turn of a held event: once it ends, its lease is no longer renewed (an error
        leaves the event to be resumed when the lease runs out). A turn cancelled by a
        shutdown stays held, and `aclose` gives its lease up for the next start."""
        try:
            yield
        except asyncio.CancelledError:
            raise
        except BaseException:
            self._release(event_id)
            raise
        self._release(event_id)

    def _release(self, event_id: int) -> None:
        self._held.discard(event_id)
        if not self._held and self._heartbeat is not None:  # nothing left to renew
            self._heartbeat.cancel()
            self._heartbeat = None

    def _hold(self, event_id: int) -> None:
        self._held.add(event_id)
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._renew_leases())

    async def _renew_leases(self) -> None:
        """While this process holds events, renew their leases (three times per lease)."""
        while True:
            await asyncio.sleep(self._limits.event_lease_s / 3)
            try:
                async with self.sessions() as s:
                    await repo.renew_leases(s, event_ids=set(self._held), owner=self.owner,
                                            lease_until=self._lease_end())
            except Exception as exc:  # the next beat tries again
                log.warning("renewing event leases failed: %s", exc)

    async def run_turn(self, turn: repo.TurnStart, question: str, sink: ReplySink) -> TurnResult:
        """Generate, stream and store the answer to a recorded question."""
        async with self._engine.connect() as s:
            past = await repo.history(s, conversation_id=turn.conversation_id,
                                      before_id=turn.question_id,
                                      limit=self._limits.history_messages)
        adapter = await self.router.route(turn.conversation_id)
        await sink.begin()
        progress = _Progress(started=time.perf_counter(), adapter=adapter)
        try:
            messages = self._fitter.fit(
                self._system_prompt,
                [ChatMessage("user" if m.role == Role.USER else "assistant", m.text) for m in past],
                question,
            )
            async with self._generations:
                done = await self._generate(messages, sink, progress)
        except asyncio.CancelledError:
            # shutting down mid-answer: nothing is stored, the event stays open and the next
            # start answers it (`resume`), like after a crash
            log.info("turn %s cancelled: left to resume", turn.question_id)
            raise
        except InferenceError as exc:
            kind = exc.kind
            log.warning("turn %s failed: %s: %s", turn.question_id, kind, exc)
            text = progress.text  # the partial answer is kept with the failed turn
            meta = repo.AnswerMeta(model=self.backend.model_name, adapter=progress.adapter,
                                   ttft_ms=progress.ttft_ms, error_kind=kind,
                                   latency_ms=progress.elapsed_ms())
            answer_id = await self._store(turn, text, AnswerStatus.FAILED, meta)
            await sink.fail(APOLOGIES.get(kind, APOLOGY))
            return TurnResult(Outcome.FAILED, answer_id, text, kind)
        text = progress.text
        meta = repo.AnswerMeta(
            model=self.backend.model_name, adapter=progress.adapter,
            prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
            ttft_ms=progress.ttft_ms, latency_ms=progress.elapsed_ms(),
            finish_reason=done.finish_reason,
        )
        if not text.strip():
            meta = dataclasses.replace(meta, error_kind="empty_answer")
            answer_id = await self._store(turn, text, AnswerStatus.FAILED, meta)
            await sink.fail(APOLOGY)
            return TurnResult(Outcome.FAILED, answer_id, text, "empty_answer")
        answer_id = await self._store(turn, text, AnswerStatus.OK, meta)
        return await self._deliver(turn, answer_id, text, sink)

    async def _deliver(self, turn: repo.TurnStart, answer_id: int, text: str,
                       sink: ReplySink) -> TurnResult:
        """Show a stored answer, then close its event (a crash before that re-delivers it)."""
        external_id = await sink.finish(text, answer_id)
        async with self._engine.connect() as s:
            await repo.mark_delivered(s, turn=turn, answer_id=answer_id,
                                      external_message_id=external_id)
        return TurnResult(Outcome.ANSWERED, answer_id, text)

    async def _generate(
        self, messages: list[ChatMessage], sink: ReplySink, progress: _Progress
    ) -> Finished:
        """Stream one completion into the sink; an unknown adapter falls back to the base model."""
        request = GenerationRequest(messages=messages, max_tokens=self._limits.max_tokens,
                                    adapter=progress.adapter)
        try:
            # aclosing: returning on Finished must close the stream now (its connection, its
            # slot in the concurrency bound), not whenever the generator is collected
            async with contextlib.aclosing(self.backend.stream(request)) as stream:
                async for event in stream:
                    if isinstance(event, Finished):
                        return event
                    if progress.ttft_ms is None:
                        progress.ttft_ms = progress.elapsed_ms()
                    progress.text += event.text
                    await sink.update(progress.text)
        except AdapterNotFound:
            if progress.adapter is None or progress.text:
                raise
            log.warning("adapter %s is not loaded: answering with the base model",
                        progress.adapter)
            progress.adapter = None
            return await self._generate(messages, sink, progress)
        raise InferenceError("the stream ended without a finish event")

    async def _store(self, turn: repo.TurnStart, text: str, status: AnswerStatus,
                     meta: repo.AnswerMeta) -> int:
        async with self._engine.connect() as s:
            return await repo.finish_turn(s, turn=turn, text=text, status=status, meta=meta)

    async def _command(self, msg: InboundMessage, text: str, sink: ReplySink) -> TurnResult:
        name = text[1:].split(maxsplit=1)[0].split("@", 1)[0].lower() if len(text) > 1 else ""
        if name not in ("reset", "help", "start"):
            await sink.notice(f"Unknown command /{name}. " + HELP_TEXT.split("\n", 1)[1])
            return TurnResult(Outcome.REJECTED)
        async with self.sessions() as s:
            if await repo.record_event(s, channel=msg.channel, event_id=msg.event_id) is None:
                return TurnResult(Outcome.DUPLICATE)
            if name == "reset":
                await repo.reset_conversation(s, channel=msg.channel, chat_id=msg.chat_id,
                                              thread_id=msg.thread_id)
        await sink.notice("Started a new conversation." if name == "reset" else HELP_TEXT)
        return TurnResult(Outcome.COMMAND, text=name)

    async def _reject(self, msg: InboundMessage, sink: ReplySink, why: str) -> TurnResult:
        async with self.sessions() as s:
            if await repo.record_event(s, channel=msg.channel, event_id=msg.event_id) is None:
                return TurnResult(Outcome.DUPLICATE)
        await sink.notice(why)
        return TurnResult(Outcome.REJECTED)

    async def vote(self, *, answer_id: int, voter_id: str, rating: int, source: str,
                   reason: str | None = None) -> Any:
        async with self.sessions() as s:
            return await repo.record_vote(s, answer_id=answer_id, voter_id=voter_id,
                                          rating=rating, source=source, reason=reason,
                                          trusted=voter_id in self.reviewer_ids)

    async def correct(self, *, answer_id: int, voter_id: str, text: str, source: str) -> Any:
        async with self.sessions() as s:
            return await repo.record_correction(s, answer_id=answer_id, voter_id=voter_id,
                                                text=text, source=source,
                                                trusted=voter_id in self.reviewer_ids)
