"""JSON log lines: a turn's lines carry its ids and trace id, and no message text."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import select

from chatloop import telemetry
from chatloop.telemetry.logs import configure_logging
from chatloop.telemetry.tracing import STATE, turn_span_id, turn_trace_id
from storage.models import Message
from tests.telegram.conftest import eventually

QUESTION = "my order number is 4417, where is it?"


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    level = root.level
    out = io.StringIO()
    handler = configure_logging("json", stream=out)
    yield out
    root.removeHandler(handler)
    root.setLevel(level)


async def asked(bot: Any, json_lines: io.StringIO
                ) -> tuple[Message, Any, Callable[[], list[dict[str, Any]]]]:
    """QUESTION asked in a private chat: the stored answer, the one shown, and a reader of the
    turn's JSON lines once the turn has logged its answer."""
    chat = bot.fake.private()
    bot.fake.say(chat, QUESTION)
    [answer] = await eventually(lambda: bot.fake.answers(chat["id"]))
    async with bot.sessions() as s:
        stored = (await s.execute(select(Message).where(Message.role == "assistant"))
                  ).scalar_one()

    def turn_lines() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
        return [line for line in lines if line.get("turn_id") == stored.reply_to_id]
    await eventually(lambda: [x for x in turn_lines() if x["logger"] == "chatloop.turns"])
    return stored, answer, turn_lines


async def test_a_turns_json_lines_carry_its_ids_and_no_text(
        spans: Any, json_lines: io.StringIO, telegram_bot: Any) -> None:
    # the adapter is not loaded: the turn logs a warning, then answers with the base model
    bot = await telegram_bot(adapter="fb-v9", loaded=False)
    stored, answer, turn_lines = await asked(bot, json_lines)
    lines = [x for x in turn_lines() if x["logger"] == "chatloop.turns"]
    assert "answered" in lines[0]["message"] and lines[0]["adapter"] == "base"
    assert any("fb-v9 is not loaded" in x["message"] for x in turn_lines())
    for line in turn_lines():
        assert line["conversation_id"] == stored.conversation_id
        assert line["channel"] == "telegram"
        assert line["adapter"] in ("fb-v9", "base")  # routed, then what answered
        assert line["trace_id"] == format(turn_trace_id(stored.reply_to_id), "032x")
        assert {"ts", "level", "logger", "message", "span_id"} <= set(line)
    text = json_lines.getvalue()
    assert QUESTION not in text and "4417" not in text
    assert stored.text not in text and answer["text"] not in text


@pytest.fixture
def ids_only() -> Iterator[None]:
    """JSON logs and metrics with no tracer provider: what `chatloop serve` switches on with
    CHATLOOP_LOG_FORMAT=json and no OTLP endpoint."""
    telemetry.configure(metrics=True, log_ids=True)
    yield
    telemetry.configure()


async def test_without_spans_a_turns_json_lines_carry_the_ids_its_root_span_would_have(
        ids_only: None, json_lines: io.StringIO, telegram_bot: Any) -> None:
    assert STATE.tracer is None
    bot = await telegram_bot()
    stored, _, turn_lines = await asked(bot, json_lines)
    lines = [x for x in turn_lines() if x["logger"] == "chatloop.turns"]
    assert "answered" in lines[0]["message"]
    for line in turn_lines():
        assert line["conversation_id"] == stored.conversation_id
        assert line["trace_id"] == format(turn_trace_id(stored.reply_to_id), "032x")
        assert line["span_id"] == format(turn_span_id(stored.reply_to_id), "016x")
