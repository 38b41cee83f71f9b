"""Through the real channels and their protocol fakes: a reviewer corrects an answer in
Telegram (👎, then a reply to the correction prompt), and the next paraphrase from another
user in Slack is answered from the memory within seconds, by either of two gateway replicas."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from bots.core import ConversationCore, CoreLimits
from bots.telegram import TelegramChannel, TelegramOptions, make_bot
from bots.telegram.outbound import RetryPolicy
from inference.prompt import PromptFitter
from storage.db import make_engine, session_factory
from storage.models import MemoryEntry, Message
from tests.fakes.inference import ScriptedBackend
from tests.fakes.telegram_api import TOKEN
from tests.memory.conftest import make_memory
from tests.memory.test_turns import ANSWER, QUESTION
from tests.slack.conftest import Gateway, fake_slack, launch, payload, sqlite_url  # noqa: F401
from tests.telegram.conftest import FAST, eventually, fake  # noqa: F401 - fixtures

PARAPHRASES = ["How long do I have to return an item?", "How many days do I have to return it?"]


def mention(n: int, text: str, user: str = "U333") -> dict[str, Any]:
    ts = f"{1735689700 + n}.000100"
    body = payload("app_mention", text=f"<@U0BOT> {text}", ts=ts, event_ts=ts, user=user)
    body["event_id"] = f"EvMem{n:04d}"
    return body


async def ask(gw: Gateway, n: int, text: str) -> Any:
    body = mention(n, text)
    assert (await gw.event(body)).status_code == 200
    [answer] = await gw.answered("C111", body["event"]["ts"])
    return answer


async def test_a_telegram_correction_answers_slack_paraphrases_in_both_replicas(  # type: ignore[no-untyped-def]
        fake, launch, sqlite_url, tokenizer, embedder) -> None:  # noqa: F811
    engine = make_engine(sqlite_url)
    sessions = session_factory(engine)
    core = ConversationCore(
        sessions=sessions, backend=ScriptedBackend(),
        fitter=PromptFitter(tokenizer, context_tokens=2048, max_tokens=128),
        system_prompt="Be brief.", limits=CoreLimits(max_tokens=128),
        reviewers=frozenset({"telegram:42"}), memory=make_memory(sessions, embedder))
    telegram = TelegramChannel(core=core, bot=make_bot(TOKEN, api_base=fake.base_url),
                               options=TelegramOptions(**FAST),
                               retry=RetryPolicy(backoff_s=0.05, max_backoff_s=0.2))
    await telegram.start()
    try:
        async with launch(sqlite_url) as one, launch(sqlite_url) as two:
            assert (await ask(one, 1, "hello")).text.startswith("Echo:")  # warm, no memory
            assert (await ask(two, 2, "hello again")).text.startswith("Echo:")

            chat = fake.private()  # telegram:42, a reviewer
            fake.say(chat, QUESTION)
            [answer] = await eventually(lambda: fake.answers(chat["id"]))
            down = answer["reply_markup"]["inline_keyboard"][0][1]["callback_data"]
            fake.press(answer, down)
            prompt = await eventually(lambda: [m for m in fake.sent(chat["id"])
                                               if "better one" in m["text"]])
            fake.say(chat, ANSWER, reply_to=prompt[0])
            await eventually(lambda: fake.sent(chat["id"])[-1]["text"].startswith("Thanks!"))
            approved = time.monotonic()
            async with sessions() as s:
                entry = (await s.execute(select(MemoryEntry))).scalar_one()
            assert (entry.question, entry.answer, entry.approved_by) == (
                QUESTION, ANSWER, "telegram:42")

            n, texts = 10, []
            for gw, text in zip((one, two), PARAPHRASES, strict=True):
                while True:  # each replica sees the entry within its refresh interval
                    n += 1
                    got = await ask(gw, n, text)
                    if got.text == ANSWER or time.monotonic() - approved > 10:
                        break
                texts.append(got.text)
            assert texts == [ANSWER, ANSWER]  # as the reviewer wrote it, number and all
            assert time.monotonic() - approved < 5
            async with sessions() as s:
                used = (await s.execute(select(Message.memory_entry_id).where(
                    Message.memory_entry_id.is_not(None)))).scalars().all()
            assert used == [entry.id, entry.id]
            # a fresh event: the loop above may have used any number below n + 1
            unrelated = await ask(one, n + 1, "Who invented the telephone?")
            assert unrelated.text.startswith("Echo:")
    finally:
        await telegram.stop()
        await engine.dispose()
