"""Log lines as text (the demo's default) or one JSON object per line (CHATLOOP_LOG_FORMAT=json).

A JSON line written while a task works on a turn carries its turn id, conversation id,
channel, adapter, trace id and span id (from `tracing.CURRENT` and the current span; without
spans, the ids the turn's root span has, derived from the turn id). What
people wrote and the answers are never logged at INFO: the code logs ids, kinds and counts.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from opentelemetry import trace

from chatloop.telemetry.tracing import CURRENT, STATE

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TURN_FIELDS = ("turn_id", "conversation_id", "channel", "adapter", "trace_id", "span_id")
_MARK = "_chatloop_handler"  # on the handler configure_logging installed (replaced next time)


class TurnContext(logging.Filter):
    """Puts the ids of the turn being worked on into each record (`record.turn_id`, ...)."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = CURRENT.get()
        if info is not None:
            record.channel = info.channel
            record.turn_id = info.turn_id
            record.conversation_id = info.conversation_id
            record.adapter = info.adapter or "base"
        if STATE.tracer is not None:  # spans are made: the current one's ids
            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                record.trace_id = format(ctx.trace_id, "032x")
                record.span_id = format(ctx.span_id, "016x")
                return True
        if info is not None and (ids := info.log_ids()) is not None:  # the turn's root's
            record.trace_id, record.span_id = ids
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the turn's ids, exc."""

    _encoder = json.JSONEncoder(ensure_ascii=False, default=str)
    _second: tuple[int, str] = (-1, "")  # the last whole second seen, formatted

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second[0]:
            self._second = (second, datetime.fromtimestamp(second, UTC).strftime(
                "%Y-%m-%dT%H:%M:%S"))
        millis = int((record.created - second) * 1000)
        out: dict[str, Any] = {
            "ts": f"{self._second[1]}.{millis:03d}+00:00",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        for name in TURN_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return self._encoder.encode(out)


def configure_logging(fmt: Literal["text", "json"] = "text", *, level: int = logging.INFO,
                      stream: Any = None) -> logging.Handler:
    """One handler on the root logger (replacing the one a previous call installed)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _MARK, True)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
        handler.addFilter(TurnContext())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return handler
