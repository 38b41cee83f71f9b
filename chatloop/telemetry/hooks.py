"""Decorators the conversation core and the learning loop wear: metrics, spans, log context.

Each wraps one method without changing what it does; when telemetry is off (`STATE.active`
false, as in tests and benchmarks that do not switch it on) it only calls through.

A turn's spans: `chatloop turn` (the root, ids derived from the turn id) with children
`turn received` (the question recorded), `prompt fitted` (history loaded, route chosen,
prompt fitted), `chat {model}` (the inference call, `gen_ai.*` attributes) and
`answer delivered`. A vote or correction is a span in its answer's trace, a child of that
turn's root span, carrying a `gen_ai.evaluation.result` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from chatloop.telemetry import metrics as m
from chatloop.telemetry.tracing import (
    CURRENT,
    STATE,
    TurnInfo,
    answer_context,
    start_root,
)

log = logging.getLogger("chatloop.turns")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
_received: OrderedDict[int, tuple[int, int, str]] = OrderedDict()  # event id -> accept times
_RECEIVED_MAX = 10_000  # accepted turns never answered (a crash mid-way) must not pile up
GATE_CHECKS = (  # words of feedback.evaluate.gate's and the parity check's reasons -> check
    ("held-out examples", "heldout_size"), ("held-out loss", "heldout_loss"),
    ("held-out answer accuracy", "heldout_accuracy"), ("another question's", "wrong_answers"),
    ("token-F1", "heldout_f1"), ("golden-set loss", "golden_loss"),
    ("preference accuracy", "preference_accuracy"), ("parity", "parity"),
    ("could not serve the candidate", "parity"),
)


def _outcome(result: Any) -> str:
    return str(getattr(result, "outcome", "unknown"))


# -- bots.core.conversation.ConversationCore -------------------------------------------------


def accepting(fn: F) -> F:
    """`ConversationCore.accept(msg, sink)`: turns ending here are counted; a recorded
    question's times are kept for its `turn received` span."""
    @functools.wraps(fn)
    async def accept(self: Any, msg: Any, sink: Any, *args: Any, **kwargs: Any) -> Any:
        if not STATE.active:
            return await fn(self, msg, sink, *args, **kwargs)
        started = time.time_ns()
        token = CURRENT.set(TurnInfo(channel=msg.channel))
        try:
            result = await fn(self, msg, sink, *args, **kwargs)
        finally:
            CURRENT.reset(token)
        turn = getattr(result, "turn", None)
        if turn is None:
            if STATE.metrics:
                m.TURNS.labels(msg.channel, _outcome(result)).inc()
        elif STATE.tracer is not None:
            _received[turn.event_id] = (started, time.time_ns(), msg.channel)
            while len(_received) > _RECEIVED_MAX:
                _received.popitem(last=False)
        return result
    return accept  # type: ignore[return-value]


def answering(fn: F) -> F:
    """`ConversationCore.answer(accepted, sink)`: the turn's root span and log context."""
    @functools.wraps(fn)
    async def answer(self: Any, accepted: Any, sink: Any, *args: Any, **kwargs: Any) -> Any:
        if not STATE.active:
            return await fn(self, accepted, sink, *args, **kwargs)
        turn = accepted.turn
        started, received, channel = _received.pop(turn.event_id, (None, None, accepted.key[0]))
        info = TurnInfo(channel=channel, turn_id=turn.question_id,
                        conversation_id=turn.conversation_id)
        token = CURRENT.set(info)
        try:
            if STATE.tracer is None:
                return await fn(self, accepted, sink, *args, **kwargs)
            with _root(info, start=started):
                if started is not None:
                    _child("turn received", started, received)
                return await fn(self, accepted, sink, *args, **kwargs)
        finally:
            CURRENT.reset(token)
    return answer  # type: ignore[return-value]


def feedback(kind: str) -> Callable[[F], F]:
    """`ConversationCore.vote(...)` / `.correct(...)` (keyword arguments): counted by channel,
    rating and the answering adapter; traced as an evaluation of the answer's turn."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def record(self: Any, **kwargs: Any) -> Any:
            result = await fn(self, **kwargs)
            if STATE.active and getattr(result, "first_delivery", True):
                await _evaluated(self.sessions, kind, kwargs, result)
            return result
        return record  # type: ignore[return-value]
    return wrap


async def _evaluated(sessions: Any, kind: str, kwargs: dict[str, Any], result: Any) -> None:
    from storage.conversations import get_message

    async with sessions() as s:
        answer = await get_message(s, message_id=result.answer_id)
    if answer is None:
        return
    adapter = answer.adapter or "base"
    rating = {1: "up", -1: "down"}.get(result.rating, "none")
    channel = str(kwargs.get("voter_id", "")).partition(":")[0] or "unknown"
    if STATE.metrics:
        m.FEEDBACK.labels(channel, kind, rating, adapter).inc()
    if STATE.tracer is None or answer.reply_to_id is None:
        return
    attrs = {"gen_ai.evaluation.name": f"user_{kind}", "gen_ai.response.id": str(answer.id),
             "gen_ai.evaluation.score.label": "corrected" if result.correction else rating,
             "chatloop.adapter": adapter, "chatloop.channel": channel,
             "chatloop.feedback_id": result.id}
    if result.rating is not None:
        attrs["gen_ai.evaluation.score.value"] = float(result.rating)
    span = STATE.tracer.start_span(f"evaluation user_{kind}",
                                   context=answer_context(answer.reply_to_id),
                                   attributes={"chatloop.turn_id": answer.reply_to_id})
    span.add_event("gen_ai.evaluation.result", attributes=attrs)
    span.end()


# -- bots.core.recovery.Recovery ------------------------------------------------------------


def resuming(fn: F) -> F:
    """`Recovery._resume_one(event, sink_for)`: counted when resumed; a new root span in the
    turn's trace (ended only if this process did resume it)."""
    @functools.wraps(fn)
    async def resume_one(self: Any, event: Any, sink_for: Any, *args: Any, **kwargs: Any
                         ) -> Any:
        if not STATE.active or event.message_id is None:
            return await fn(self, event, sink_for, *args, **kwargs)
        token = CURRENT.set(info := TurnInfo(channel=event.channel, turn_id=event.message_id))
        try:
            with _root(info, attempt=event.attempts + 1, end=False) as root:
                resumed = await fn(self, event, sink_for, *args, **kwargs)
        finally:
            CURRENT.reset(token)
        if resumed:
            if root is not None:
                root.end()
            if STATE.metrics:
                m.EVENTS_RESUMED.labels(event.channel).inc()
        return resumed
    return resume_one  # type: ignore[return-value]


def given_up(channel: str) -> None:
    """An event failed every resume and was closed."""
    if STATE.metrics:
        m.EVENTS_GIVEN_UP.labels(channel).inc()


# -- bots.core.turns.Turns ------------------------------------------------------------------


def running(fn: F) -> F:
    """`Turns.run(turn, question, sink)`: turns in flight and their outcomes."""
    @functools.wraps(fn)
    async def run(self: Any, turn: Any, question: str, sink: Any, *args: Any, **kwargs: Any
                  ) -> Any:
        if not STATE.active:
            return await fn(self, turn, question, sink, *args, **kwargs)
        info = CURRENT.get()
        token = None
        if info is None:  # a turn not begun by `answer` (tests that run Turns alone)
            token = CURRENT.set(info := TurnInfo(channel="unknown"))
        info.turn_id, info.conversation_id = turn.question_id, turn.conversation_id
        info.run_started_ns, info.prompt_done = time.time_ns(), False
        started = time.perf_counter()
        gauge = m.TURNS_IN_FLIGHT.labels(info.channel) if STATE.metrics else None
        if gauge is not None:
            gauge.inc()
        try:
            result = await fn(self, turn, question, sink, *args, **kwargs)
        except asyncio.CancelledError:
            _count_turn(info.channel, "cancelled")
            raise
        finally:
            if gauge is not None:
                gauge.dec()
            if token is not None:
                CURRENT.reset(token)
        outcome = _outcome(result)
        _count_turn(info.channel, outcome)
        # one line per turn: ids, outcome and timing, never the text
        log.info("turn %s %s in %.0f ms (%s)", turn.question_id, outcome,
                 (time.perf_counter() - started) * 1000, result.error_kind or "ok")
        if STATE.tracer is None:
            return result
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes({"chatloop.outcome": outcome,
                                 "chatloop.adapter": result.adapter or "base"})
            if result.answer_id is not None:
                span.set_attribute("chatloop.answer_id", result.answer_id)
            if result.error_kind:
                span.set_attribute("error.type", result.error_kind)
        return result
    return run  # type: ignore[return-value]


def _count_turn(channel: str, outcome: str) -> None:
    if STATE.metrics:
        m.TURNS.labels(channel, outcome).inc()


def generating(fn: F) -> F:
    """`Turns._generate(messages, sink, progress)`: the inference span and GenAI metrics."""
    @functools.wraps(fn)
    async def generate(self: Any, messages: Any, sink: Any, progress: Any, *args: Any,
                       **kwargs: Any) -> Any:
        info = CURRENT.get()
        if not STATE.active or (info is not None and info.in_generate):  # off, or the retry
            return await fn(self, messages, sink, progress, *args, **kwargs)
        info = info or TurnInfo(channel="unknown")
        model = getattr(self.backend, "model_name", "") or "unknown"
        tracer = STATE.tracer
        if tracer is not None and not info.prompt_done and info.run_started_ns is not None:
            _child("prompt fitted", info.run_started_ns, time.time_ns(),
                   {"chatloop.prompt_messages": len(messages)})
            info.prompt_done = True
        info.adapter = progress.adapter
        requested = progress.adapter or model
        span = None
        if tracer is not None:
            span = tracer.start_span(f"chat {requested}", kind=SpanKind.CLIENT, attributes={
                "gen_ai.operation.name": "chat", "gen_ai.request.model": requested,
                "gen_ai.provider.name": _provider(self.backend),
                "gen_ai.request.max_tokens": self._limits.max_tokens,
                "chatloop.adapter": progress.adapter or "base", "chatloop.base_model": model})
        started, done, error = time.perf_counter(), None, ""
        info.in_generate = True
        try:
            if span is None:
                done = await fn(self, messages, sink, progress, *args, **kwargs)
            else:
                with trace.use_span(span, end_on_exit=False):
                    done = await fn(self, messages, sink, progress, *args, **kwargs)
            return done
        except Exception as exc:
            error = str(getattr(exc, "kind", "") or type(exc).__name__)
            raise
        finally:
            info.in_generate = False
            info.adapter = progress.adapter
            _inference_done(span, model, progress, done, error, started)
    return generate  # type: ignore[return-value]


def _provider(backend: Any) -> str:
    inner = getattr(backend, "inner", backend)  # the registry's counting wrapper
    name = type(inner).__name__.lower()
    return "vllm" if "openai" in name else "chatloop.embedded" if "embedded" in name else name


def _inference_done(span: Any, model: str, progress: Any, done: Any, error: str,
                    started: float) -> None:
    used = progress.adapter or model
    labels = ("chat", used, progress.adapter or "base")
    if STATE.metrics:
        m.OPERATION_DURATION.labels(*labels, error).observe(time.perf_counter() - started)
        if progress.ttft_ms is not None:
            first = progress.started + progress.ttft_ms / 1000 - started
            m.TIME_TO_FIRST_CHUNK.labels(*labels).observe(max(first, 0.0))
        if done is not None:
            for kind, n in (("input", done.prompt_tokens), ("output", done.completion_tokens)):
                if n is not None:
                    m.TOKEN_USAGE.labels(*labels, kind).observe(n)
    if span is None:
        return
    span.set_attributes({"gen_ai.response.model": used,
                         "chatloop.adapter": progress.adapter or "base"})
    if progress.ttft_ms is not None:
        span.set_attribute("chatloop.ttft_ms", progress.ttft_ms)
    if done is not None:
        if done.prompt_tokens is not None:
            span.set_attribute("gen_ai.usage.input_tokens", done.prompt_tokens)
        if done.completion_tokens is not None:
            span.set_attribute("gen_ai.usage.output_tokens", done.completion_tokens)
        if done.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [done.finish_reason])
    if error:
        span.set_attribute("error.type", error)
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def delivering(fn: F) -> F:
    """`Turns.deliver(turn, answer_id, text, sink, adapter)`: the `answer delivered` span."""
    @functools.wraps(fn)
    async def deliver(self: Any, turn: Any, answer_id: int, text: str, sink: Any,
                      adapter: str | None, *args: Any, **kwargs: Any) -> Any:
        if STATE.tracer is None:
            return await fn(self, turn, answer_id, text, sink, adapter, *args, **kwargs)
        info = CURRENT.get()
        if info is not None:
            info.adapter = adapter
            info.conversation_id = info.conversation_id or turn.conversation_id
        with STATE.tracer.start_as_current_span("answer delivered", attributes={
                "gen_ai.response.id": str(answer_id), "chatloop.answer_id": answer_id}):
            return await fn(self, turn, answer_id, text, sink, adapter, *args, **kwargs)
    return deliver  # type: ignore[return-value]


# -- feedback.loop, feedback.canary ---------------------------------------------------------


def gate_check(reason: str) -> str:
    """The gate check a rejection reason names (`other` for one this table lacks)."""
    return next((check for words, check in GATE_CHECKS if words in reason), "other")


def training_run(fn: F) -> F:
    """`feedback.loop.run_cycle`: runs by outcome; a rejected run's failed gate checks."""
    @functools.wraps(fn)
    async def run_cycle(*args: Any, **kwargs: Any) -> Any:
        result = await fn(*args, **kwargs)
        if STATE.metrics:
            m.TRAINING_RUNS.labels(str(result.status)).inc()
            if str(result.status) == "rejected":
                for reason in result.reasons:
                    m.GATE_FAILURES.labels(gate_check(reason)).inc()
        return result
    return run_cycle  # type: ignore[return-value]


def canary_evaluated(fn: F) -> F:
    """`feedback.canary.evaluate_canary`: the votes counted so far and the decision."""
    @functools.wraps(fn)
    async def evaluate(*args: Any, **kwargs: Any) -> Any:
        outcome = await fn(*args, **kwargs)
        if not STATE.metrics:
            return outcome
        m.CANARY_DECISIONS.labels(str(outcome.decision)).inc()
        m.CANARY_VOTES.clear()
        for arm, votes in (("canary", outcome.canary_votes), ("control", outcome.control_votes)):
            if votes is not None and outcome.canary:
                m.CANARY_VOTES.labels(outcome.canary, arm, "down").set(votes.down)
                m.CANARY_VOTES.labels(outcome.canary, arm, "up").set(votes.n - votes.down)
        m.CANARY_HANDOFFS.clear()
        for arm, handed in (("canary", outcome.canary_handoffs),
                            ("control", outcome.control_handoffs)):
            if handed is not None and outcome.canary:
                m.CANARY_HANDOFFS.labels(outcome.canary, arm, "answers").set(handed.n)
                m.CANARY_HANDOFFS.labels(outcome.canary, arm, "handoffs").set(handed.down)
        return outcome
    return evaluate  # type: ignore[return-value]


# -- spans ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _root(info: TurnInfo, *, start: int | None = None, attempt: int = 0,
          end: bool = True) -> Iterator[Any]:
    """The turn's root span, current inside; None when tracing is off."""
    if STATE.tracer is None or info.turn_id is None:
        yield None
        return
    root = start_root(STATE.tracer, "chatloop turn", info.turn_id, attempt=attempt,
                      start_time=start, attributes={"chatloop.channel": info.channel,
                                                    "chatloop.turn_id": info.turn_id,
                                                    "chatloop.resume": attempt})
    if info.conversation_id is not None:
        root.set_attribute("chatloop.conversation_id", info.conversation_id)
    with trace.use_span(root, end_on_exit=end, record_exception=True,
                        set_status_on_exception=True):
        yield root


def _child(name: str, start: int, end: int | None, attributes: dict[str, Any] | None = None
           ) -> None:
    assert STATE.tracer is not None
    span = STATE.tracer.start_span(name, start_time=start, attributes=attributes)
    span.end(end_time=end)
