"""Telegram hand-off end to end: real aiogram client, the fake Bot API with forum topics."""

from __future__ import annotations

import logging
from typing import Any

from bots.core import InboundMessage, Outcome
from bots.core.handoff import BACK
from bots.telegram.convert import HUMAN_BUTTON
from storage.models import Feedback, Handoff, HandoffMessage
from tests.fakes.inference import ScriptedBackend
from tests.fakes.sinks import RecordingSink
from tests.handoff.conftest import AGENT, AGENTS, handoff_core, rows, settled
from tests.telegram.conftest import eventually


def _texts(fake: Any, chat_id: int, thread: int | None = None) -> list[str]:
    return [m["text"] for m in fake.sent(chat_id, thread) if "text" in m]


async def _escalated(bot: Any) -> tuple[dict[str, Any], int]:
    """A user asks, is answered, presses "Talk to a person": (their chat, the topic id)."""
    chat = bot.fake.private(42, "Ann")
    bot.fake.say(chat, "When are you open?")
    [answer] = await eventually(lambda: bot.fake.answers(chat["id"]))
    assert answer["reply_markup"]["inline_keyboard"][1][0]["callback_data"] == HUMAN_BUTTON
    bot.fake.press(answer, HUMAN_BUTTON)
    await eventually(lambda: any("asked for a person" in t for t in _texts(bot.fake, 42)))
    topics = await eventually(lambda: bot.fake.topics.get(AGENTS))
    [thread] = topics
    posted = await eventually(lambda: _texts(bot.fake, AGENTS, thread))
    assert "When are you open?" in posted[0] and "nine to five" in posted[0]
    return chat, thread


async def test_a_person_takes_over_the_bot_steps_back_and_the_pair_is_stored(start_desk) -> None:  # type: ignore[no-untyped-def]
    bot = await start_desk()
    chat, thread = await _escalated(bot)
    asked = len(bot.backend.requests)

    bot.fake.say(chat, "I want a refund for order 7")  # relayed, not answered
    await eventually(lambda: "User: I want a refund for order 7" in _texts(bot.fake, AGENTS,
                                                                          thread))
    bot.fake.say(bot.fake.chats[AGENTS], "Refunds take five days; I started yours.",
                 user=AGENT, thread=thread)
    await eventually(lambda: "Maya: Refunds take five days; I started yours." in _texts(
        bot.fake, 42))
    assert any("Maya from the team" in t for t in _texts(bot.fake, 42))
    assert len(bot.backend.requests) == asked and len(bot.fake.answers(42)) == 1

    fb = [f for f in await rows(bot.sessions, Feedback) if f.source == "handoff"]
    assert len(fb) == 1 and fb[0].voter_id == "telegram:77" and fb[0].trusted
    assert fb[0].correction == "Refunds take five days; I started yours."
    assert fb[0].review_status == "approved"
    [h] = await rows(bot.sessions, Handoff)
    assert (h.status, h.agent_id, h.answer_id) == ("held", "telegram:77", fb[0].answer_id)

    bot.fake.say(bot.fake.chats[AGENTS], "/done", user=AGENT, thread=thread)
    await eventually(lambda: BACK in _texts(bot.fake, 42))
    bot.fake.say(chat, "And on Sundays?")
    await eventually(lambda: len(bot.fake.answers(42)) == 2)
    assert len(bot.backend.requests) == asked + 1
    [h] = await rows(bot.sessions, Handoff)
    assert h.status == "closed" and h.closed_by == "telegram:77"
    await settled(bot.sessions, HandoffMessage, lambda ms: all(m.delivered_at for m in ms))


async def test_human_command_and_phrases_and_another_replica_stays_silent(
        start_desk, sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    bot = await start_desk()
    chat = bot.fake.private(42, "Ann")
    bot.fake.say(chat, "/human")
    [thread] = await eventually(lambda: bot.fake.topics.get(AGENTS))
    other = ScriptedBackend()
    replica = handoff_core(sessions, tokenizer, other)  # a second gateway on the same database
    sink = RecordingSink()
    msg = InboundMessage(channel="telegram", event_id="999001", chat_id="42", user_id="42",
                         text="still there?")
    result = await replica.handle(msg, sink)
    assert result.outcome == Outcome.RELAYED and not other.requests and sink.final is None
    assert result.relay is not None and result.relay.text == "still there?"
    bot.fake.say(chat, "can I talk to a human please")  # a phrase: asked already
    await eventually(lambda: any("asked already" in t for t in _texts(bot.fake, 42)))
    assert len(bot.fake.topics[AGENTS]) == 1 and not bot.backend.requests
    del thread


async def test_a_restart_keeps_the_conversation_with_the_person(start_desk) -> None:  # type: ignore[no-untyped-def]
    bot = await start_desk()
    chat, thread = await _escalated(bot)
    bot.fake.say(bot.fake.chats[AGENTS], "Hello, Maya here.", user=AGENT, thread=thread)
    await eventually(lambda: "Maya: Hello, Maya here." in _texts(bot.fake, 42))
    await bot.channel.stop()
    again = await start_desk()
    asked = len(again.backend.requests)
    bot.fake.say(chat, "Thanks, what next?")
    await eventually(lambda: "User: Thanks, what next?" in _texts(bot.fake, AGENTS, thread))
    assert len(again.backend.requests) == asked and len(bot.fake.answers(42)) == 1


async def test_a_deleted_topic_is_created_again_and_nothing_is_lost(start_desk, caplog) -> None:  # type: ignore[no-untyped-def]
    bot = await start_desk()
    chat, thread = await _escalated(bot)
    bot.fake.delete_topic(AGENTS, thread)
    with caplog.at_level(logging.WARNING):
        bot.fake.say(chat, "Hello? Anyone?")
        topics = await eventually(lambda: len(bot.fake.topics[AGENTS]) == 1
                                  and thread not in bot.fake.topics[AGENTS]
                                  and bot.fake.topics[AGENTS])
        [new] = topics
        await eventually(lambda: "User: Hello? Anyone?" in _texts(bot.fake, AGENTS, new))
    assert any("topic is gone" in r.getMessage() for r in caplog.records)
    [h] = await rows(bot.sessions, Handoff)
    assert h.agent_ref == str(new) and h.error == "telegram:topic_deleted"
    await settled(bot.sessions, HandoffMessage, lambda ms: all(m.delivered_at for m in ms))


async def test_bot_removed_from_the_agents_group_is_stored(start_desk, caplog) -> None:  # type: ignore[no-untyped-def]
    bot = await start_desk()
    chat, thread = await _escalated(bot)
    bot.fake.blocked.add(AGENTS)
    with caplog.at_level(logging.WARNING):
        bot.fake.say(chat, "Hello? Anyone?")
        await eventually(lambda: any("telegram:kicked" in r.getMessage()
                                     for r in caplog.records))
    del thread
    [h] = await rows(bot.sessions, Handoff)
    [m] = [m for m in await rows(bot.sessions, HandoffMessage) if m.direction == "in"]
    assert h.error == "telegram:kicked" and h.status == "waiting"
    assert m.text == "Hello? Anyone?" and m.delivered_at is None and m.error == "telegram:kicked"
    assert len(bot.backend.requests) == 1  # the first answer only


async def test_a_user_who_blocked_the_bot_ends_the_hand_off(start_desk, caplog) -> None:  # type: ignore[no-untyped-def]
    bot = await start_desk()
    chat, thread = await _escalated(bot)
    bot.fake.blocked.add(chat["id"])
    with caplog.at_level(logging.WARNING):
        bot.fake.say(bot.fake.chats[AGENTS], "Are you still there?", user=AGENT, thread=thread)
        await eventually(lambda: any("cannot be reached" in t
                                     for t in _texts(bot.fake, AGENTS, thread)))
    [h] = await rows(bot.sessions, Handoff)
    assert (h.status, h.error, h.closed_by) == ("closed", "telegram:blocked", "system:blocked")
    [out] = [m for m in await rows(bot.sessions, HandoffMessage) if m.direction == "out"]
    assert out.error == "telegram:blocked" and out.delivered_at is None
    assert any("telegram:blocked" in r.getMessage() for r in caplog.records)


async def test_idle_hand_off_returns_to_the_bot_and_a_long_wait_is_apologised_for(
        start_desk) -> None:  # type: ignore[no-untyped-def]
    bot = await start_desk(idle_s=0.5, wait_s=0.3, ticket_url="https://help.example.com/t")
    chat, thread = await _escalated(bot)
    await eventually(lambda: any("help.example.com/t" in t for t in _texts(bot.fake, 42)))
    bot.fake.say(bot.fake.chats[AGENTS], "On it.", user=AGENT, thread=thread)
    await eventually(lambda: BACK in _texts(bot.fake, 42))
    [h] = await rows(bot.sessions, Handoff)
    assert h.closed_by == "system:idle"
    late = [t for t in _texts(bot.fake, 42) if "help.example.com/t" in t]
    assert len(late) == 1
    del chat


async def test_two_downvotes_in_a_conversation_ask_for_a_person(start_desk) -> None:  # type: ignore[no-untyped-def]
    """CHATLOOP_HANDOFF_AFTER_DOWNVOTES=2: the second 👎 of the user in the conversation
    escalates (the user is told when, a topic opens with the conversation so far)."""
    bot = await start_desk(after_downvotes=2)
    chat = bot.fake.private(42, "Ann")
    for n, question in enumerate(("When are you open?", "And on Sundays?"), 1):
        bot.fake.say(chat, question)
        answers = await eventually(lambda n=n: len(bot.fake.answers(42)) >= n
                                   and bot.fake.answers(42))
        keyboard = answers[n - 1]["reply_markup"]["inline_keyboard"]
        answer_id = keyboard[0][0]["callback_data"].split(":")[1]
        bot.fake.press(answers[n - 1], f"v:{answer_id}:d")
        await settled(bot.sessions, Feedback, lambda fs, n=n: len(fs) == n)
        if n == 1:  # one 👎: the bot keeps answering
            assert not await rows(bot.sessions, Handoff)
    await eventually(lambda: any("asked for a person" in t for t in _texts(bot.fake, 42)))
    [thread] = await eventually(lambda: bot.fake.topics.get(AGENTS))
    posted = await eventually(lambda: _texts(bot.fake, AGENTS, thread))
    assert "downvotes" in posted[0] and "And on Sundays?" in posted[0]
    [h] = await rows(bot.sessions, Handoff)
    assert h.reason == "downvotes" and h.user_id == "telegram:42" and h.status == "waiting"


async def test_an_agent_answering_the_moment_the_topic_appears_reaches_the_user(  # type: ignore[no-untyped-def]
        start_desk) -> None:
    """The topic exists before it is linked to its hand-off: a message in that moment waits
    for the link instead of being dropped."""
    bot = await start_desk()
    desk = bot.core.handoff
    link, find = desk.escalated, desk.by_agent_ref
    missed: list[int] = []

    async def looked_up(agent_chat: str, agent_ref: str) -> Any:
        found = await find(agent_chat, agent_ref)
        if found is None:
            missed.append(int(agent_ref))
        return found

    async def link_late(handoff_id: int, *, agent_chat: str, agent_ref: str) -> None:
        bot.fake.say(bot.fake.chats[AGENTS], "Hello, I am here.", user=AGENT,
                     thread=int(agent_ref))
        await eventually(lambda: missed)  # the agent's message found no hand-off yet
        await link(handoff_id, agent_chat=agent_chat, agent_ref=agent_ref)

    desk.by_agent_ref, desk.escalated = looked_up, link_late
    chat = bot.fake.private(42, "Ann")
    bot.fake.say(chat, "/human")
    await eventually(lambda: "Maya: Hello, I am here." in _texts(bot.fake, 42))
    [h] = await rows(bot.sessions, Handoff)
    assert (h.status, h.agent_id) == ("held", "telegram:77")
    del chat
