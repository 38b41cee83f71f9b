"""Private chats end to end: real aiogram client, fake Bot API server, scripted model."""

from __future__ import annotations

from sqlalchemy import select

from storage.models import Message
from tests.fakes.inference import ScriptedBackend
from tests.telegram.conftest import delivered_answer, eventually

ANSWER = "Our opening hours are nine to five on weekdays, and ten to two on Saturdays."


async def test_private_answer_streams_drafts_then_exact_final_text(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot(ScriptedBackend(answer=lambda r: ANSWER, chunk=6, delay=0.02,
                                          first_token_delay=0.5))
    chat = bot.fake.private()
    bot.fake.say(chat, "When are you open?")
    [final] = await eventually(lambda: bot.fake.answers(chat["id"]))
    assert final["text"] == ANSWER
    drafts = [d for d in bot.fake.drafts if d["chat_id"] == chat["id"]]
    assert len(drafts) >= 2 and len({d["draft_id"] for d in drafts}) == 1
    assert all(ANSWER.startswith(d["text"]) for d in drafts)
    assert [d["text"] for d in drafts] == sorted((d["text"] for d in drafts), key=len)
    [typing] = bot.fake.calls_to("sendChatAction")  # while the model thought, then no more
    assert typing.params["action"] == "typing" and typing.at < drafts[0]["at"]
    buttons = [b["callback_data"] for b in final["reply_markup"]["inline_keyboard"][0]]
    async with bot.sessions() as s:
        answer = await delivered_answer(s)
    assert buttons == [f"v:{answer.id}:u", f"v:{answer.id}:d"]
    assert answer.text == ANSWER and answer.external_message_id == str(final["message_id"])


async def test_a_fast_answer_is_sent_once_without_previews(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot(ScriptedBackend(answer=lambda r: ANSWER, chunk=6, delay=0.005),
                          preview_after_s=2.0)  # ample, even on a loaded machine (default 0.25)
    private, group = bot.fake.private(), bot.fake.group()
    bot.fake.say(private, "When are you open?")
    bot.fake.mention(group, "When are you open?")
    [final] = await eventually(lambda: bot.fake.answers(private["id"]))
    [in_group] = await eventually(lambda: bot.fake.answers(group["id"]))
    assert final["text"] == in_group["text"] == ANSWER
    assert not bot.fake.drafts and not bot.fake.calls_to("editMessageText")
    assert len(bot.fake.calls_to("sendMessage")) == 2


async def test_commands_are_registered_and_reset_starts_a_new_conversation(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot()
    assert [c["command"] for c in bot.fake.commands] == ["start", "help", "reset"]
    chat = bot.fake.private()
    bot.fake.say(chat, "/start")
    await eventually(lambda: bot.fake.sent(chat["id"]))
    assert "/reset" in bot.fake.sent(chat["id"])[0]["text"]
    bot.fake.say(chat, "first question")
    await eventually(lambda: len(bot.fake.answers(chat["id"])) == 1)
    bot.fake.say(chat, "/reset")
    await eventually(lambda: "new conversation" in bot.fake.sent(chat["id"])[-1]["text"])
    bot.fake.say(chat, "second question")
    await eventually(lambda: len(bot.fake.answers(chat["id"])) == 2)
    assert [m.content for m in bot.backend.requests[-1].messages] == ["Be brief.",
                                                                      "second question"]


async def test_media_gets_a_note_and_edits_are_not_answered_again(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot()
    chat = bot.fake.private()
    bot.fake.say(chat, None, photo=[{"file_id": "A", "file_unique_id": "B", "width": 1,
                                     "height": 1}])
    note = await eventually(lambda: bot.fake.sent(chat["id"]))
    assert "only read text" in note[0]["text"]
    question = bot.fake.say(chat, "what time is it?")["message"]
    await eventually(lambda: bot.fake.answers(chat["id"]))
    bot.fake.edit(question, "what time is it now?")
    bot.fake.say(chat, "done?")
    await eventually(lambda: len(bot.fake.answers(chat["id"])) == 2)
    assert [r.messages[-1].content for r in bot.backend.requests] == ["what time is it?", "done?"]


async def test_rate_limit_gets_a_polite_message(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot(limits={"rate_limit_per_minute": 1})
    chat = bot.fake.private()
    bot.fake.say(chat, "one")
    bot.fake.say(chat, "two")
    sent = await eventually(lambda: len(bot.fake.sent(chat["id"])) == 2
                            and bot.fake.sent(chat["id"]))
    assert sorted(m["text"] for m in sent) == [
        "Echo: one", "You are sending messages too quickly. Please wait a minute."]
    assert len(bot.backend.requests) == 1


async def test_inference_failure_gives_an_apology_and_a_failed_turn(start_bot) -> None:  # type: ignore[no-untyped-def]
    from inference.errors import BackendUnavailable

    bot = await start_bot(ScriptedBackend(fail_after=1, error=BackendUnavailable("down")))
    chat = bot.fake.private()
    bot.fake.say(chat, "hello there, are you working?")
    sent = await eventually(lambda: bot.fake.sent(chat["id"]))
    assert "unavailable" in sent[0]["text"] and not bot.fake.answers(chat["id"])
    async with bot.sessions() as s:
        answer = (await s.execute(select(Message).where(Message.role == "assistant"))).scalar_one()
    assert (answer.status, answer.error_kind) == ("failed", "unavailable")
