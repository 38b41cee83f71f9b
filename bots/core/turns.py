"""One recorded question -> history -> prompt -> route -> streamed answer -> stored, shown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bots.core.leases import Leases
from bots.core.memory import AnswerMemory
from bots.core.types import CoreLimits, Outcome, ReplySink, Router, TurnResult
from chatloop.telemetry import hooks
from inference.base import ChatMessage, Finished, GenerationRequest, InferenceBackend
from inference.errors import AdapterNotFound, InferenceError
from inference.memory import Recall, Reference
from inference.prompt import PromptFitter, reference_exchanges, with_references
from storage import conversations
from storage.conversations import AnswerMeta, TurnStart
from storage.models import AnswerStatus, Role

log = logging.getLogger(__name__)

APOLOGIES = {
    "unavailable": "Sorry, the assistant is unavailable right now. Please try again in a minute.",
    "rate_limited": "Sorry, the assistant is busy right now. Please try again shortly.",
    "context_too_long": "Sorry, that is too long for me to read. Please send a shorter message.",
}
APOLOGY = "Sorry, something went wrong while answering. Please try again."


@dataclass(slots=True)
class _Progress:
    """One answer as it streams: what a failed turn still stores."""

    started: float
    adapter: str | None
    conversation_id: int | None = None  # keeps the conversation on one inference server
    text: str = ""
    ttft_ms: float | None = None
    memory_refs: list[int] | None = None  # the memory entries quoted in the prompt

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


class Turns:
    """Generates, streams, stores and delivers the answers to recorded questions."""

    def __init__(self, *, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession],
                 backend: InferenceBackend, router: Router, fitter: PromptFitter,
                 system_prompt: str, limits: CoreLimits,
                 memory: AnswerMemory | None = None, leases: Leases | None = None) -> None:
        """`leases`: storing and delivering confirm this process still holds the turn's event
        (LeaseLost if not), so a process that stalled past its lease answers nothing twice."""
        # the turn path (history, store, deliver) runs on plain connections: an ORM
        # session's set-up and bookkeeping cost more than its few statements
        self._engine, self._sessions = engine, sessions
        self.backend, self.router = backend, router
        self._fitter, self._system_prompt, self._limits = fitter, system_prompt, limits
        self._generations = asyncio.Semaphore(limits.max_concurrent_generations)
        self.memory = memory
        self._leases = leases

    @hooks.running
    async def run(self, turn: TurnStart, question: str, sink: ReplySink) -> TurnResult:
        """Generate, stream and store the answer to a recorded question (or send an approved
        answer from the memory as it is, when one matches closely)."""
        started = time.perf_counter()
        async with self._engine.connect() as s:
            past = await conversations.history(s, conversation_id=turn.conversation_id,
                                               before_id=turn.question_id,
                                               limit=self._limits.history_messages)
        recall = Recall()
        if self.memory is not None:
            previous = next((m.text for m in reversed(past) if m.role == Role.USER), None)
            recall = await self.memory.recall(question, previous=previous)
            if recall.verbatim is not None:
                return await self._from_memory(turn, recall.verbatim, sink, started)
        adapter = await self.router.route(turn.conversation_id)
        await sink.begin()
        progress = _Progress(started=started, adapter=adapter,
                             conversation_id=turn.conversation_id,
                             memory_refs=[r.id for r in recall.references] or None)
        refs = [(r.question, r.answer) for r in recall.references]
        try:
            messages = self._fitter.fit(
                with_references(self._system_prompt, refs),
                [ChatMessage("user" if m.role == Role.USER else "assistant", m.text) for m in past],
                question, examples=reference_exchanges(refs),
            )
            async with self._generations:
                done = await self._generate(messages, sink, progress)
        except asyncio.CancelledError:
            # shutting down mid-answer: nothing is stored, the event stays open and the next
            # start answers it (`resume`), like after a crash
            log.info("turn %s cancelled: left to resume", turn.question_id)
            raise
        except InferenceError as exc:
            log.warning("turn %s failed: %s: %s", turn.question_id, exc.kind, exc)
            return await self._failed(turn, progress, exc.kind, sink,
                                      APOLOGIES.get(exc.kind, APOLOGY))
        meta = self._meta(progress, done)
        if not progress.text.strip():
            return await self._failed(turn, progress, "empty_answer", sink, APOLOGY, meta)
        answer_id = await self._store(turn, progress.text, AnswerStatus.OK, meta)
        return await self.deliver(turn, answer_id, progress.text, sink, progress.adapter,
                                  confirmed=True)

    async def _from_memory(self, turn: TurnStart, entry: Reference, sink: ReplySink,
                           started: float) -> TurnResult:
        """Send an approved answer as it is, stored as answered from its memory entry."""
        await sink.begin()
        meta = AnswerMeta(model=self.backend.model_name, adapter=None,
                          latency_ms=(time.perf_counter() - started) * 1000,
                          finish_reason="memory", memory_entry_id=entry.id)
        answer_id = await self._store(turn, entry.answer, AnswerStatus.OK, meta)
        return await self.deliver(turn, answer_id, entry.answer, sink, None,
                                  memory_entry_id=entry.id, confirmed=True)

    def _meta(self, progress: _Progress, done: Finished | None = None) -> AnswerMeta:
        return AnswerMeta(
            model=self.backend.model_name, adapter=progress.adapter,
            prompt_tokens=done.prompt_tokens if done else None,
            completion_tokens=done.completion_tokens if done else None,
            ttft_ms=progress.ttft_ms, latency_ms=progress.elapsed_ms(),
            finish_reason=done.finish_reason if done else None,
            memory_refs=progress.memory_refs,
        )

    async def _failed(self, turn: TurnStart, progress: _Progress, kind: str, sink: ReplySink,
                      apology: str, meta: AnswerMeta | None = None) -> TurnResult:
        """Store a failed turn (with its partial answer) and apologise."""
        meta = dataclasses.replace(meta or self._meta(progress), error_kind=kind)
        answer_id = await self._store(turn, progress.text, AnswerStatus.FAILED, meta)
        await sink.fail(apology)
        return TurnResult(Outcome.FAILED, answer_id, progress.text, kind, progress.adapter)

    @hooks.delivering
    async def deliver(self, turn: TurnStart, answer_id: int, text: str, sink: ReplySink,
                      adapter: str | None, *, memory_entry_id: int | None = None,
                      confirmed: bool = False) -> TurnResult:
        """Show a stored answer, then close its event (a crash before that re-delivers it).
        The lease is confirmed first, unless storing the answer just did (`confirmed`)."""
        if self._leases is not None and not confirmed:
            await self._leases.confirm(turn.event_id)
        external_id = await sink.finish(text, answer_id)
        async with self._engine.connect() as s:
            await conversations.mark_delivered(s, turn=turn, answer_id=answer_id,
                                               external_message_id=external_id)
        return TurnResult(Outcome.ANSWERED, answer_id, text, adapter=adapter,
                          memory_entry_id=memory_entry_id)

    async def close(self, turn: TurnStart, why: str) -> None:
        """End a turn nobody will finish: a stored answer is left undelivered, else the turn
        is stored as failed (`why`)."""
        async with self._sessions() as s:
            stored = await conversations.stored_answer(s, question_id=turn.question_id)
            if stored is not None and stored.id is not None:
                await conversations.mark_delivered(s, turn=turn, answer_id=stored.id,
                                                   external_message_id=None)
            else:
                meta = AnswerMeta(model=self.backend.model_name, adapter=None, error_kind=why)
                await conversations.finish_turn(s, turn=turn, text="",
                                                status=AnswerStatus.FAILED, meta=meta)

    @hooks.generating
    async def _generate(self, messages: list[ChatMessage], sink: ReplySink,
                        progress: _Progress) -> Finished:
        """Stream one completion into the sink; an unknown adapter falls back to the base model."""
        request = GenerationRequest(messages=messages, max_tokens=self._limits.max_tokens,
                                    adapter=progress.adapter,
                                    conversation_id=progress.conversation_id)
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

    async def _store(self, turn: TurnStart, text: str, status: AnswerStatus,
                     meta: AnswerMeta) -> int:
        async with self._engine.connect() as s:
            if self._leases is not None:  # in the answer's transaction
                await self._leases.confirm(turn.event_id, within=s)
            return await conversations.finish_turn(s, turn=turn, text=text, status=status,
                                                   meta=meta)
