"""Groups and forum topics end to end: who is answered, throttled edits, separate topics."""

from __future__ import annotations

import asyncio

from tests.fakes.inference import ScriptedBackend
from tests.fakes.telegram_api import NOT_MODIFIED
from tests.telegram.conftest import eventually


async def test_only_mentions_replies_and_addressed_commands_are_answered(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot()
    group = bot.fake.group()
    bob = bot.fake.user(43, "Bob")
    bot.fake.say(group, "lunch at noon?", user=bob)
    bot.fake.say(group, "/help@other_bot", user=bob)
    bot.fake.mention(group, "what are your hours?", user=bob)
    [answer] = await eventually(lambda: bot.fake.answers(group["id"]))
    assert answer["text"] == "Echo: what are your hours?"
    assert answer["reply_to_message"]["text"] == "@test_bot what are your hours?"
    bot.fake.say(group, "and on Sundays?", user=bob, reply_to=answer)
    await eventually(lambda: len(bot.fake.answers(group["id"])) == 2)
    bot.fake.say(group, "/help@test_bot", user=bob)
    await eventually(lambda: any("/reset" in m["text"] for m in bot.fake.sent(group["id"])))
    await asyncio.sleep(0.2)
    assert [r.messages[-1].content for r in bot.backend.requests] == [
        "what are your hours?", "and on Sundays?"]
    assert not bot.fake.drafts  # drafts are for private chats only


async def test_group_answer_grows_by_throttled_edits_and_ends_exact(start_bot) -> None:  # type: ignore[no-untyped-def]
    text = "One two three four five six seven eight nine ten eleven twelve thirteen."
    bot = await start_bot(ScriptedBackend(answer=lambda r: text, chunk=3, delay=0.03),
                          edit_interval_s=0.25)
    group = bot.fake.group()
    bot.fake.mention(group, "count please")
    [answer] = await eventually(lambda: bot.fake.answers(group["id"]))
    assert answer["text"] == text
    edits = bot.fake.calls_to("editMessageText")
    assert len(edits) >= 2  # grew in place, then the final text with the buttons
    times = [c.at for c in bot.fake.calls_to("sendMessage", "editMessageText")]
    streaming = times[:-1]  # the final edit is not throttled
    gaps = [b - a for a, b in zip(streaming, streaming[1:], strict=False)]
    # paced 0.25 s apart when sent (deltas come every 0.03 s); times are taken on arrival at
    # the fake, so under load one late request can shorten the next gap: check the mean too
    assert gaps and min(gaps) >= 0.1 and sum(gaps) / len(gaps) >= 0.22, gaps
    assert len(bot.fake.sent(group["id"])) == 1  # one message, updated in place
    assert all(c.status == 200 for c in bot.fake.calls)  # never an unchanged edit
    assert not [c for c in bot.fake.calls if NOT_MODIFIED in str(c.params)]


async def test_forum_topics_are_separate_conversations(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot()
    forum = bot.fake.group(-1009876543210, forum=True)
    bot.fake.mention(forum, "topic seven question", thread=7)
    await eventually(lambda: bot.fake.answers(forum["id"], thread=7))
    bot.fake.mention(forum, "topic eight question", thread=8)
    [answer] = await eventually(lambda: bot.fake.answers(forum["id"], thread=8))
    assert answer["text"] == "Echo: topic eight question"
    assert [m.content for m in bot.backend.requests[-1].messages] == ["Be brief.",
                                                                      "topic eight question"]
    bot.fake.mention(forum, "follow-up", thread=7)
    await eventually(lambda: len(bot.fake.answers(forum["id"], thread=7)) == 2)
    assert [m.content for m in bot.backend.requests[-1].messages] == [
        "Be brief.", "topic seven question", "Echo: topic seven question", "follow-up"]


async def test_an_answer_follows_a_group_upgraded_to_a_supergroup(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot(ScriptedBackend(chunk=4, delay=0.2))  # 1 s: time to upgrade mid-way
    old = bot.fake.group(-4001)
    bot.fake.mention(old, "first question")
    await eventually(lambda: bot.fake.sent(old["id"]))  # a preview is shown in the old group
    new = bot.fake.upgrade(old, -1004001)  # then the group is upgraded, mid-answer
    [answer] = await eventually(lambda: bot.fake.answers(new["id"]))
    assert answer["text"] == "Echo: first question"
    bot.fake.mention(old, "second question")  # an update from before the upgrade
    await eventually(lambda: len(bot.fake.answers(new["id"])) == 2)
    refused = [c for c in bot.fake.calls if c.status == 400]
    assert len(refused) == 1  # the move is remembered: one refusal, not one per call
