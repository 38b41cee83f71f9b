"""Private chats end to end: real aiogram client, fake Bot API server, scripted model."""

from __future__ import annotations

from sqlalchemy import select

from storage.models import Message
from tests.fakes.inference import ScriptedBackend
from tests.telegram.conftest import eventually

ANSWER = "Our opening hours are nine to five on weekdays, and ten to two on Saturdays."


async def test_private_answer_streams_drafts_then_exact_final_text(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot(ScriptedBackend(answer=lambda r: ANSWER, chunk=6, delay=0.02))
    chat = bot.fake.private()
    bot.fake.say(chat, "When are you open?")
    [final] = await eventually(lambda: bot.fake.answers(chat["id"]))
    assert final["text"] == ANSWER
    drafts = [d for d in bot.fake.drafts if d["chat_id"] == chat["id"]]
    assert len(drafts) >= 2 and len({d["draft_id"] for d in drafts}) == 1
    assert all(ANSWER.startswith(d["text"]) for d in drafts)
    assert [d["text"] for d in drafts] == sorted((d["text"] for d in drafts), key=len)
    assert bot.fake.calls_to("sendChatAction")[0].params["action"] == "typing"
    buttons = [b["callback_data"] for b in final["reply_markup"]["inline_keyboard"][0]]
    async with bot.sessions() as s:
        answer = (await s.execute(select(Message).where(Message.role == "assistant"))).scalar_one()
    assert buttons == [f"v:{answer.id}:u", f"v:{answer.id}:d"]
    assert answer.text == ANSWER and answer.external_message_id == str(final["message_id"])
