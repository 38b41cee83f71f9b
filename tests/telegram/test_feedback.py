"""Votes and corrections end to end: votes change, 👎 invites a correction, reviewers trusted."""

from __future__ import annotations

from sqlalchemy import select

from storage.models import Feedback
from tests.telegram.conftest import eventually


async def _answered(bot, chat):  # type: ignore[no-untyped-def]
    bot.fake.say(chat, "When do you open?")
    [answer] = await eventually(lambda: bot.fake.answers(chat["id"]))
    up, down = (b["callback_data"] for b in answer["reply_markup"]["inline_keyboard"][0])
    return answer, up, down


async def test_vote_then_change_it_then_correct_the_answer(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot()
    chat = bot.fake.private()
    answer, up, down = await _answered(bot, chat)
    bot.fake.press(answer, up)
    await eventually(lambda: len(bot.fake.answered_callbacks) == 1)
    bot.fake.press(answer, down)
    await eventually(lambda: len(bot.fake.answered_callbacks) == 2)
    assert list(bot.fake.answered_callbacks.values())[0] == "Thanks for the feedback!"
    prompt = await eventually(lambda: [m for m in bot.fake.sent(chat["id"])
                                       if "better one" in m["text"]])
    assert prompt[0]["reply_to_message"]["message_id"] == answer["message_id"]
    async with bot.sessions() as s:
        [vote] = (await s.execute(select(Feedback))).scalars().all()
    answer_id = int(up.split(":")[1])
    assert (vote.answer_id, vote.voter_id, vote.rating, vote.source) == (
        answer_id, "telegram:42", -1, "telegram")

    bot.fake.say(chat, "We open at eight.", reply_to=prompt[0])
    thanks = await eventually(lambda: [m for m in bot.fake.sent(chat["id"])
                                       if m["text"].startswith("Thanks!")])
    assert "reviewer will check" in thanks[0]["text"]
    async with bot.sessions() as s:
        fb = (await s.execute(select(Feedback).execution_options(populate_existing=True))
              ).scalar_one()
    assert (fb.answer_id, fb.rating, fb.correction, fb.trusted, fb.review_status) == (
        answer_id, -1, "We open at eight.", False, "pending")
    assert len(bot.backend.requests) == 1  # the correction was not treated as a question


async def test_reviewer_corrections_are_trusted(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot(reviewers=frozenset({"telegram:42"}))
    chat = bot.fake.private()
    answer, _, down = await _answered(bot, chat)
    bot.fake.press(answer, down)
    prompt = await eventually(lambda: [m for m in bot.fake.sent(chat["id"])
                                       if "better one" in m["text"]])
    bot.fake.say(chat, "Eight o'clock.", reply_to=prompt[0])
    await eventually(lambda: bot.fake.sent(chat["id"])[-1]["text"].startswith("Thanks!"))
    async with bot.sessions() as s:
        fb = (await s.execute(select(Feedback))).scalar_one()
    assert (fb.correction, fb.trusted, fb.review_status) == ("Eight o'clock.", True, "approved")


async def test_unknown_and_stale_buttons_are_still_answered(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot()
    chat = bot.fake.private()
    answer, _, _ = await _answered(bot, chat)
    bot.fake.press(answer, "v:999999:u")
    bot.fake.press(answer, "regen:1")
    await eventually(lambda: len(bot.fake.answered_callbacks) == 2)
    gone = "That answer is no longer available."
    assert set(bot.fake.answered_callbacks.values()) == {None, gone}
    async with bot.sessions() as s:
        assert (await s.execute(select(Feedback))).first() is None


async def test_a_vote_in_a_group_is_per_user(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot()
    group = bot.fake.group()
    bot.fake.mention(group, "question")
    [answer] = await eventually(lambda: bot.fake.answers(group["id"]))
    up, down = (b["callback_data"] for b in answer["reply_markup"]["inline_keyboard"][0])
    bot.fake.press(answer, up, user=bot.fake.user(43, "Bob"))
    bot.fake.press(answer, down, user=bot.fake.user(44, "Cy"))
    await eventually(lambda: len(bot.fake.answered_callbacks) == 2)
    async with bot.sessions() as s:
        votes = (await s.execute(select(Feedback).order_by(Feedback.voter_id))).scalars().all()
    assert [(v.voter_id, v.rating) for v in votes] == [("telegram:43", 1),
                                                      ("telegram:44", -1)]


async def test_a_correction_in_a_group_is_stored_not_answered(start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot()
    group = bot.fake.group()
    bot.fake.mention(group, "question")
    [answer] = await eventually(lambda: bot.fake.answers(group["id"]))
    down = answer["reply_markup"]["inline_keyboard"][0][1]["callback_data"]
    bot.fake.press(answer, down, user=bot.fake.user(44, "Cy"))
    prompt = await eventually(lambda: [m for m in bot.fake.sent(group["id"])
                                       if "better one" in m["text"]])
    bot.fake.say(group, "The right answer.", user=bot.fake.user(44, "Cy"), reply_to=prompt[0])
    await eventually(lambda: bot.fake.sent(group["id"])[-1]["text"].startswith("Thanks!"))
    async with bot.sessions() as s:
        fb = (await s.execute(select(Feedback))).scalar_one()
    assert (fb.voter_id, fb.rating, fb.correction) == ("telegram:44", -1, "The right answer.")
    assert len(bot.backend.requests) == 1
