"""Nothing lost, nothing doubled: duplicates, confirmation order, flood control, errors, length."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref

import pytest
from sqlalchemy import func, select

from storage.models import InboundEvent, Message
from tests.fakes.inference import ScriptedBackend
from tests.fakes.telegram_api import NOT_MODIFIED
from tests.telegram.conftest import delivered_answer, eventually


def _offsets(fake) -> list[int]:  # type: ignore[no-untyped-def]
    return [c.params.get("offset") or 0 for c in fake.calls_to("getUpdates")]


async def test_the_same_update_delivered_twice_is_answered_once(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot()
    chat = bot.fake.private()
    update = bot.fake.say(chat, "hello")
    bot.fake.updates.append(update)  # in the same batch
    await eventually(lambda: bot.fake.answers(chat["id"]))
    bot.fake.updates.append(update)  # and again later, after it was confirmed
    bot.fake.say(chat, "next")
    await eventually(lambda: len(bot.fake.answers(chat["id"])) == 2)
    assert [r.messages[-1].content for r in bot.backend.requests] == ["hello", "next"]
    async with bot.sessions() as s:
        questions = (await s.execute(select(func.count()).select_from(Message)
                                     .where(Message.role == "user"))).scalar()
    assert questions == 2


async def test_updates_are_confirmed_only_once_recorded_and_chats_do_not_wait(start_bot) -> None:  # type: ignore[no-untyped-def]
    backend = ScriptedBackend(answer=lambda r: "slow " * 80 if "slow" in r.messages[-1].content
                              else "quick", chunk=8, delay=0.04)
    bot = await start_bot(backend)
    unrecorded: list[int] = []

    async def check(update_ids: list[int]) -> None:  # runs as Telegram forgets the updates
        async with bot.sessions() as s:
            seen = set((await s.execute(select(InboundEvent.external_event_id))).scalars())
        unrecorded.extend(u for u in update_ids if str(u) not in seen)

    bot.fake.on_confirm = check
    ann, bob = bot.fake.private(42, "Ann"), bot.fake.private(43, "Bob")
    bot.fake.say(ann, "slow question")
    behind = bot.fake.say(ann, "second question")  # its answer waits for the first one
    bot.fake.say(bob, "quick question")
    await eventually(lambda: bot.fake.answers(bob["id"]))
    await eventually(lambda: max(_offsets(bot.fake)) > behind["update_id"])
    assert not bot.fake.answers(ann["id"])  # Bob did not wait, nor did the confirmation
    await eventually(lambda: len(bot.fake.answers(ann["id"])) == 2)
    assert unrecorded == []
    asked = [r.messages[-1].content for r in backend.requests]
    assert asked.index("slow question") < asked.index("second question")  # Ann's order kept
    assert [m.content for m in backend.requests[-1].messages][-3:] == [
        "slow question", "slow " * 80, "second question"]


async def test_flood_control_on_send_is_waited_out(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot()
    chat = bot.fake.private()
    bot.fake.flood("sendMessage", retry_after=1)
    bot.fake.say(chat, "hi")
    [answer] = await eventually(lambda: bot.fake.answers(chat["id"]))
    assert answer["text"] == "Echo: hi"
    refused, accepted = bot.fake.calls_to("sendMessage")
    assert (refused.status, accepted.status) == (429, 200)
    assert accepted.at - refused.at >= 1.0


async def test_flood_control_on_the_final_edit_is_waited_out(start_bot) -> None:  # type: ignore[no-untyped-def]
    text = "A group answer that streams in a few pieces before it is done."
    bot = await start_bot(ScriptedBackend(answer=lambda r: text, chunk=10, delay=0.03))
    group = bot.fake.group()
    bot.fake.flood("editMessageText", retry_after=1,
                   when=lambda p: "reply_markup" in p)  # the final edit, with the buttons
    bot.fake.mention(group, "go")
    [answer] = await eventually(lambda: bot.fake.answers(group["id"]))
    assert answer["text"] == text
    finals = [c for c in bot.fake.calls_to("editMessageText") if "reply_markup" in c.params]
    assert [c.status for c in finals] == [429, 200] and finals[1].at - finals[0].at >= 1.0


async def test_message_is_not_modified_is_a_no_op(start_bot) -> None:  # type: ignore[no-untyped-def]
    text = "A group answer that streams in a few pieces before it is done."
    bot = await start_bot(ScriptedBackend(answer=lambda r: text, chunk=10, delay=0.03))
    group = bot.fake.group()
    bot.fake.fail("editMessageText", 400, NOT_MODIFIED, when=lambda p: "reply_markup" in p)
    bot.fake.mention(group, "go")
    await eventually(lambda: [c for c in bot.fake.calls_to("editMessageText") if c.status == 400])
    async with bot.sessions() as s:
        answer = await delivered_answer(s)
    [message] = bot.fake.sent(group["id"])
    assert answer.external_message_id == str(message["message_id"])  # taken as delivered
    finals = [c for c in bot.fake.calls_to("editMessageText") if "reply_markup" in c.params]
    assert len(finals) == 1  # and not retried


async def test_server_errors_are_retried(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot()
    chat = bot.fake.private()
    bot.fake.fail("sendMessage", 500, "Internal Server Error")
    bot.fake.garble("sendMessage")  # a proxy's HTML error page: not even JSON
    bot.fake.say(chat, "hi")
    await eventually(lambda: bot.fake.answers(chat["id"]))
    assert [c.status for c in bot.fake.calls_to("sendMessage")] == [500, 502, 200]


async def test_a_hung_call_times_out_and_is_retried(start_bot) -> None:  # type: ignore[no-untyped-def]
    text = "A group answer that streams in a few pieces before it is done."
    bot = await start_bot(ScriptedBackend(answer=lambda r: text, chunk=10, delay=0.03),
                          timeout_s=1)
    group = bot.fake.group()
    bot.fake.slow("editMessageText", 2.0, when=lambda p: "reply_markup" in p)
    bot.fake.mention(group, "go")
    [answer] = await eventually(lambda: bot.fake.answers(group["id"]))
    assert answer["text"] == text
    finals = [c for c in bot.fake.calls_to("editMessageText") if "reply_markup" in c.params]
    assert len(finals) == 2 and finals[1].at - finals[0].at >= 1.0
    assert len(bot.fake.sent(group["id"])) == 1


async def test_a_blocked_chat_is_recorded_and_not_retried(start_bot, caplog) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot()
    chat = bot.fake.private()
    bot.fake.blocked.add(chat["id"])
    with caplog.at_level(logging.WARNING, logger="bots.telegram"):
        bot.fake.say(chat, "hi")
        await eventually(lambda: bot.fake.calls_to("sendMessage"))
        await eventually(lambda: "not delivered" in caplog.text)
    assert "blocked" in caplog.text
    assert len(bot.fake.calls_to("sendMessage")) == 1
    for _ in range(200):  # recorded just after the delivery is given up
        async with bot.sessions() as s:
            event = (await s.execute(select(InboundEvent))).scalar_one()
            answer = (await s.execute(select(Message).where(Message.role == "assistant"))
                      ).scalar_one_or_none()
        if answer is not None and answer.error_kind is not None:
            break
        await asyncio.sleep(0.02)
    assert (answer.status, answer.external_message_id, event.status) == ("ok", None, "done")
    assert answer.error_kind == "telegram:blocked"


@pytest.mark.parametrize("kind", ["private", "group"])
async def test_a_5000_character_answer_arrives_in_two_parts(start_bot, kind: str) -> None:  # type: ignore[no-untyped-def]
    paragraphs = [f"Part {i}: " + "lorem ipsum " * 60 for i in range(7)]
    text = "\n\n".join(p.strip() for p in paragraphs)
    assert len(text) > 5000
    bot = await start_bot(ScriptedBackend(answer=lambda r: text, chunk=400, delay=0.01))
    chat = bot.fake.private() if kind == "private" else bot.fake.group()
    (bot.fake.say if kind == "private" else bot.fake.mention)(chat, "long please")
    await eventually(lambda: bot.fake.answers(chat["id"]))
    sent = bot.fake.sent(chat["id"])
    assert len(sent) == 2 and "reply_markup" not in sent[0] and "reply_markup" in sent[1]
    assert "\n\n".join(m["text"] for m in sent) == text
    assert sent[0]["text"].endswith("lorem ipsum") and sent[1]["text"].startswith("Part ")
    assert all(c.status == 200 for c in bot.fake.calls)


async def test_markdown_telegram_rejects_still_arrives_as_plain_text(start_bot) -> None:  # type: ignore[no-untyped-def]
    text = "Use **bold** and `code` for this."
    bot = await start_bot(ScriptedBackend(answer=lambda r: text))
    chat = bot.fake.private()
    bot.fake.fail("sendMessage", 400, 'Bad Request: can\'t parse entities: Unsupported start tag '
                  '"b" at byte offset 4', when=lambda p: p.get("parse_mode") == "HTML")
    bot.fake.say(chat, "format it")
    [answer] = await eventually(lambda: bot.fake.answers(chat["id"]))
    assert answer["text"] == text and "entities" not in answer
    html, plain = bot.fake.calls_to("sendMessage")
    assert (html.status, html.params["parse_mode"], plain.status) == (400, "HTML", 200)
    assert "parse_mode" not in plain.params


async def test_markdown_is_sent_as_html_when_accepted(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot(ScriptedBackend(answer=lambda r: "Use **bold** & <tags>."))
    chat = bot.fake.private()
    bot.fake.say(chat, "format it")
    [answer] = await eventually(lambda: bot.fake.answers(chat["id"]))
    assert answer["text"] == "Use bold & <tags>."
    assert answer["entities"] == [{"type": "bold", "offset": 4, "length": 4}]


async def test_response_types_survive_garbage_collection(start_bot) -> None:  # type: ignore[no-untyped-def]
    # aiogram builds Response[T] per call and pydantic caches it weakly: without the bot
    # holding it, every garbage collection makes the next call rebuild it (1-4 ms)
    from aiogram.methods import Response, SendMessage

    bot = await start_bot()
    chat = bot.fake.private()
    bot.fake.say(chat, "hi")
    await eventually(lambda: bot.fake.answers(chat["id"]))
    held = weakref.ref(Response[SendMessage.__returning__])  # type: ignore[name-defined]
    gc.collect()
    assert held() is not None
