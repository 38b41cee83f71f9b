"""/metrics after Telegram turns and votes: the exposition parsed, counters and histograms
checked."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from storage.models import Message
from tests.telegram.conftest import eventually

MODEL = (("adapter", "fb-v1"), ("gen_ai_operation_name", "chat"),
         ("gen_ai_request_model", "fb-v1"))


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_metrics_count_turns_tokens_votes_and_platform_calls(
        spans: Any, scrape: Any, telegram_bot: Any) -> None:
    bot = await telegram_bot(adapter="fb-v1")
    before = await scrape()
    chat = bot.fake.private()
    bot.fake.flood("sendMessage", retry_after=1)  # one 429, honoured, then sent
    for n, question in enumerate(["When do you open?", "Where are you?", "Do you deliver?"]):
        bot.fake.say(chat, question)
        await eventually(lambda n=n: len(bot.fake.answers(chat["id"])) == n + 1, within=20)
    answers = bot.fake.answers(chat["id"])
    for answer, button in ((answers[0], 0), (answers[1], 1)):  # 👍 the first, 👎 the second
        keyboard = answer["reply_markup"]["inline_keyboard"]
        bot.fake.press(answer, keyboard[0][button]["callback_data"])
    await eventually(lambda: len(bot.fake.answered_callbacks) == 2)

    async def settled() -> dict:
        after = await scrape()
        return after if delta(before, after, "chatloop_turns_total", channel="telegram",
                              outcome="answered") == 3 else {}
    after: dict = {}
    for _ in range(100):
        if after := await settled():
            break
    assert after, "three answered turns were never counted"
    async with bot.sessions() as s:
        stored = (await s.execute(select(Message).where(Message.role == "assistant"))
                  ).scalars().all()
    assert len(stored) == 3

    d = {k: delta(before, after, k[0], **dict(k[1])) for k in after}
    tokens = "gen_ai_client_token_usage"
    for kind, column in (("input", "prompt_tokens"), ("output", "completion_tokens")):
        labels = tuple(sorted((*MODEL, ("gen_ai_token_type", kind))))
        assert d[(f"{tokens}_count", labels)] == 3
        assert d[(f"{tokens}_sum", labels)] == sum(getattr(m, column) for m in stored)
    ok = tuple(sorted((*MODEL, ("error_type", ""))))
    assert d[("gen_ai_client_operation_duration_seconds_count", ok)] == 3
    assert d[("gen_ai_client_operation_time_to_first_chunk_seconds_count", MODEL)] == 3
    inf = tuple(sorted((*MODEL, ("error_type", ""), ("le", "+Inf"))))
    assert d[("gen_ai_client_operation_duration_seconds_bucket", inf)] == 3

    def votes(rating: str) -> float:
        return delta(before, after, "chatloop_feedback_total", channel="telegram", kind="vote",
                     rating=rating, adapter="fb-v1")
    assert (votes("up"), votes("down")) == (1, 1)

    def calls(method: str, status: str) -> float:
        return delta(before, after, "chatloop_platform_api_calls_total", channel="telegram",
                     method=method, status=status)
    assert calls("sendMessage", "429") == 1
    assert calls("sendMessage", "200") >= 3
    assert calls("answerCallbackQuery", "200") == 2
    assert after[("chatloop_turns_in_flight", (("channel", "telegram"),))] == 0


def test_a_family_exposes_what_prometheus_client_would() -> None:
    """Buckets are cumulative with `le` inclusive, counters end in _total, a cleared gauge
    shows no series, and a wrong number of labels is refused."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from chatloop.telemetry.metrics import Family

    registry = CollectorRegistry()
    hist = Family("histogram", "t_seconds", "a histogram", ["k"], buckets=(0.1, 1.0),
                  registry=registry)
    count = Family("counter", "t_events", "a counter", ["k"], registry=registry)
    gauge = Family("gauge", "t_level", "a gauge", ["k"], registry=registry)
    for value in (0.1, 0.5, 1.0, 7.0):  # on a bound counts in that bucket
        hist.labels("a").observe(value)
    count.labels("a").inc()
    count.labels("a").inc(2)
    gauge.labels("x").set(3)
    gauge.clear()
    gauge.labels("y").inc()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode())
               for s in f.samples}
    assert samples == {
        ("t_seconds_bucket", (("k", "a"), ("le", "0.1"))): 1.0,
        ("t_seconds_bucket", (("k", "a"), ("le", "1.0"))): 3.0,
        ("t_seconds_bucket", (("k", "a"), ("le", "+Inf"))): 4.0,
        ("t_seconds_count", (("k", "a"),)): 4.0,
        ("t_seconds_sum", (("k", "a"),)): 8.6,
        ("t_events_total", (("k", "a"),)): 3.0,
        ("t_level", (("k", "y"),)): 1.0,
    }
    with pytest.raises(ValueError, match="takes labels"):
        count.labels("a", "b")
