"""What is switched on, the turn a task works on (a context variable), and trace ids.

A turn's trace id and its root span's id are derived from the question's id (the turn id) and
a per-deployment salt, so that a vote arriving hours later, in any gateway process, finds its
answer's trace from the answer's `reply_to_id` alone: nothing is stored for it.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import random
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

SCOPE = "chatloop"


@dataclass
class State:
    metrics: bool = False
    tracer: trace.Tracer | None = None
    # JSON log lines carry the turn's trace id: without a tracer (nothing exports spans) the
    # ids are derived from the turn id alone, as the root span's would be, and no span is made
    log_ids: bool = False
    provider: Any = None  # the SDK TracerProvider we made (flushed and shut down at exit)
    salt: bytes = b"chatloop"

    @property
    def active(self) -> bool:
        return self.metrics or self.tracer is not None or self.log_ids


STATE = State()


@dataclass
class TurnInfo:
    """The turn a task is working on: what every log line of it carries."""

    channel: str
    turn_id: int | None = None  # the question's message id
    conversation_id: int | None = None
    adapter: str | None = None
    run_started_ns: int | None = None  # Turns.run began (the "prompt fitted" span starts)
    prompt_done: bool = False
    in_generate: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    ids: tuple[int, str, str] | None = None  # turn id, its trace id and root span id in hex

    def log_ids(self) -> tuple[str, str] | None:
        """The turn's trace id and root span id as log lines write them (None before the
        question is recorded)."""
        if self.turn_id is None:
            return None
        if self.ids is None or self.ids[0] != self.turn_id:
            self.ids = (self.turn_id, format(turn_trace_id(self.turn_id), "032x"),
                        format(turn_span_id(self.turn_id), "016x"))
        return self.ids[1], self.ids[2]


CURRENT: contextvars.ContextVar[TurnInfo | None] = contextvars.ContextVar(
    "chatloop_turn", default=None)
# the ids the next span gets (set just around starting a turn's root span)
_NEXT_IDS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "chatloop_next_ids", default=None)


def _derive(kind: str, turn_id: int, bits: int) -> int:
    digest = hashlib.blake2b(f"{kind}:{turn_id}".encode(), key=STATE.salt[:64],
                             digest_size=bits // 8).digest()
    return int.from_bytes(digest, "big") or 1


def turn_trace_id(turn_id: int) -> int:
    return _derive("trace", turn_id, 128)


def turn_span_id(turn_id: int, attempt: int = 0) -> int:
    """The root span of a turn (attempt 0); a resumed turn's root is another span of the same
    trace."""
    return _derive(f"root{attempt}" if attempt else "root", turn_id, 64)


def answer_context(turn_id: int) -> Any:
    """The context whose parent is the root span of turn `turn_id` (a vote's parent)."""
    parent = SpanContext(trace_id=turn_trace_id(turn_id), span_id=turn_span_id(turn_id),
                         is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(parent))


def start_root(tracer: trace.Tracer, name: str, turn_id: int, *, attempt: int = 0,
               start_time: int | None = None, attributes: dict[str, Any] | None = None
               ) -> trace.Span:
    """A turn's root span, with the trace and span ids derived from its turn id."""
    token = _NEXT_IDS.set((turn_trace_id(turn_id), turn_span_id(turn_id, attempt)))
    try:
        return tracer.start_span(name, context=trace.set_span_in_context(trace.INVALID_SPAN),
                                 start_time=start_time, attributes=attributes)
    finally:
        _NEXT_IDS.reset(token)


class TurnIds:
    """The SDK's id generator: random ids, except for a turn's root span (`start_root`)."""

    def generate_span_id(self) -> int:
        ids = _NEXT_IDS.get()
        return ids[1] if ids else random.getrandbits(64) or 1

    def is_trace_id_random(self) -> bool:
        return False  # a turn's is derived from its id (the W3C "random" flag stays off)

    def generate_trace_id(self) -> int:
        ids = _NEXT_IDS.get()
        return ids[0] if ids else random.getrandbits(128) or 1


def otlp_configured() -> bool:
    """Whether the standard OTLP endpoint variables ask for spans to be exported."""
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def make_provider(service: str, *, otlp: bool | None = None, processors: tuple[Any, ...] = ()
                  ) -> Any:
    """An SDK TracerProvider for `service` (OTEL_SERVICE_NAME wins); spans are exported over
    OTLP/HTTP when `otlp` (default: when OTEL_EXPORTER_OTLP_ENDPOINT or
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set), and to `processors` (tests)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
    provider = TracerProvider(resource=Resource.create(attrs),
                              id_generator=TurnIds())  # type: ignore[arg-type]
    if otlp if otlp is not None else otlp_configured():
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    for processor in processors:
        provider.add_span_processor(processor)
    return provider
