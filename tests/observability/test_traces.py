"""Traces in memory: one message's span tree, the adapter on the inference span, its vote linked."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from chatloop.telemetry.tracing import turn_span_id, turn_trace_id
from storage.models import Message
from tests.telegram.conftest import eventually


async def test_a_message_makes_one_span_tree_and_its_vote_joins_the_trace(
        spans: Any, telegram_bot: Any) -> None:
    bot = await telegram_bot(adapter="fb-v1")
    chat = bot.fake.private()
    bot.fake.say(chat, "When do you open?")
    [answer] = await eventually(lambda: bot.fake.answers(chat["id"]))
    [root] = await eventually(lambda: [s for s in spans.get_finished_spans()
                                       if s.name == "chatloop turn"])
    async with bot.sessions() as s:
        stored = (await s.execute(select(Message).where(Message.role == "assistant"))
                  ).scalar_one()
    assert stored.reply_to_id is not None
    assert root.context.trace_id == turn_trace_id(stored.reply_to_id)
    assert root.context.span_id == turn_span_id(stored.reply_to_id)
    assert root.parent is None
    assert root.attributes["chatloop.outcome"] == "answered"
    assert root.attributes["chatloop.adapter"] == "fb-v1"

    children = {s.name: s for s in spans.get_finished_spans()
                if s.parent is not None and s.parent.span_id == root.context.span_id}
    assert set(children) == {"turn received", "prompt fitted", "chat fb-v1", "answer delivered"}
    assert all(s.context.trace_id == root.context.trace_id for s in children.values())
    order = ["turn received", "prompt fitted", "chat fb-v1", "answer delivered"]
    starts = [children[name].start_time for name in order]
    assert starts == sorted(starts)
    chat_span = children["chat fb-v1"].attributes
    assert chat_span["gen_ai.operation.name"] == "chat"
    assert chat_span["gen_ai.request.model"] == chat_span["gen_ai.response.model"] == "fb-v1"
    assert chat_span["chatloop.adapter"] == "fb-v1"
    assert chat_span["gen_ai.usage.input_tokens"] == stored.prompt_tokens
    assert chat_span["gen_ai.usage.output_tokens"] == stored.completion_tokens
    assert children["answer delivered"].attributes["gen_ai.response.id"] == str(stored.id)

    up = answer["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
    bot.fake.press(answer, up)
    [vote] = await eventually(lambda: [s for s in spans.get_finished_spans()
                                       if s.name == "evaluation user_vote"])
    assert vote.context.trace_id == root.context.trace_id
    assert vote.parent is not None and vote.parent.span_id == root.context.span_id
    [event] = vote.events
    assert event.name == "gen_ai.evaluation.result"
    assert event.attributes["gen_ai.evaluation.score.value"] == 1.0
    assert event.attributes["gen_ai.evaluation.score.label"] == "up"
    assert event.attributes["gen_ai.response.id"] == str(stored.id)
    assert event.attributes["chatloop.adapter"] == "fb-v1"
