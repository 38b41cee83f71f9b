"""Who gets answered, and as what: the pure update converters, on recorded payloads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiogram.types import Update, User

from bots.telegram.convert import (
    Ask,
    Correct,
    Skip,
    StaleButton,
    TextOnly,
    Vote,
    classify,
    correction_prompt,
    lane,
    vote_keyboard,
)
from tests.fakes.telegram_api import parse_html

ME = User(id=123456, is_bot=True, first_name="TestBot", username="test_bot")
PAYLOADS = Path(__file__).with_name("payloads")


def load(name: str, **changes: Any) -> Update:
    data = json.loads((PAYLOADS / f"{name}.json").read_text())
    body = data.get("message") or data.get("callback_query") or data.get("edited_message")
    body.update(changes)
    return Update.model_validate(data)


def test_private_text_is_a_question() -> None:
    action = classify(load("private_text"), ME)
    assert isinstance(action, Ask)
    m = action.message
    assert (m.channel, m.event_id, m.chat_id, m.user_id, m.text, m.thread_id, m.message_id) == (
        "telegram", "10001", "42", "42", "hello bot", "", "11")
    assert (action.where.chat_id, action.where.private, action.where.reply_to) == (42, True, 11)


def test_group_mention_is_answered_without_the_mention() -> None:
    action = classify(load("group_mention"), ME)
    assert isinstance(action, Ask) and action.message.text == "what's up?"
    assert not action.where.private


def test_group_message_for_someone_else_is_ignored() -> None:
    assert isinstance(classify(load("group_plain"), ME), Skip)


def test_group_reply_to_the_bot_is_answered() -> None:
    action = classify(load("group_reply_to_bot"), ME)
    assert isinstance(action, Ask) and action.message.text == "and on Sundays?"


@pytest.mark.parametrize(("text", "answered"), [
    ("/help@test_bot", True), ("/reset", True), ("/help@other_bot", False),
    ("/HELP@Test_Bot", True),
])
def test_group_commands_must_be_addressed_to_the_bot(text: str, answered: bool) -> None:
    action = classify(load("group_plain", text=text), ME)
    assert isinstance(action, Ask) is answered
    if answered:
        assert action.message.text == text  # type: ignore[union-attr]


def test_mention_of_another_user_is_ignored() -> None:
    update = load("group_plain", text="@alice can you check?",
                  entities=[{"type": "mention", "offset": 0, "length": 6}])
    assert isinstance(classify(update, ME), Skip)


def test_forum_topic_is_its_own_conversation_and_topic_root_is_not_a_reply_to_the_bot() -> None:
    action = classify(load("forum_topic"), ME)
    assert isinstance(action, Ask) and action.message.thread_id == "7"
    assert action.where.thread_id == 7
    assert lane(action) == ("chat", "-1009876543210", "7")
    other = load("forum_topic", message_thread_id=8)
    assert lane(classify(other, ME)) != lane(action)


def test_other_bots_edits_and_service_messages_are_ignored() -> None:
    bot_from = {"id": 99, "is_bot": True, "first_name": "Other"}
    assert isinstance(classify(load("private_text", **{"from": bot_from}), ME), Skip)
    assert isinstance(classify(load("edited"), ME), Skip)
    joined = load("group_plain", text=None, new_chat_members=[bot_from])
    assert isinstance(classify(joined, ME), Skip)


def test_media_gets_a_text_only_note_in_private_and_silence_in_groups() -> None:
    assert isinstance(classify(load("private_photo"), ME), TextOnly)
    group = {"id": -100123, "type": "supergroup", "title": "Team"}
    assert isinstance(classify(load("private_photo", chat=group), ME), Skip)


def test_vote_button_carries_the_answer_id() -> None:
    action = classify(load("callback_vote"), ME)
    assert isinstance(action, Vote)
    assert (action.answer_id, action.rating, action.voter_id, action.answer_message_id) == (
        11, -1, "telegram:42", 14)
    assert isinstance(classify(load("callback_vote", data="regen:11"), ME), StaleButton)
    up = load("callback_vote", data="v:11:u")
    assert classify(up, ME).rating == 1  # type: ignore[union-attr]


def test_keyboard_callback_data_fits_in_64_bytes() -> None:
    buttons = vote_keyboard(2**63 - 1).inline_keyboard[0]
    assert [b.text for b in buttons] == ["👍", "👎"]
    assert all(len(b.callback_data.encode()) <= 64 for b in buttons)  # type: ignore[union-attr]


def test_reply_to_the_correction_prompt_is_a_correction() -> None:
    action = classify(load("correction_reply"), ME)
    assert isinstance(action, Correct)
    assert (action.answer_id, action.text, action.voter_id) == (
        11, "We open at eight on weekdays.", "telegram:42")


def test_prompt_sent_by_the_bot_parses_to_the_link_the_converter_expects() -> None:
    text, entities = parse_html(correction_prompt(11, ME))
    data = json.loads((PAYLOADS / "correction_reply.json").read_text())
    assert data["message"]["reply_to_message"]["text"] == text
    assert data["message"]["reply_to_message"]["entities"] == entities


def test_a_quoted_answer_without_the_link_is_not_a_correction() -> None:
    data = json.loads((PAYLOADS / "correction_reply.json").read_text())
    del data["message"]["reply_to_message"]["entities"]
    assert isinstance(classify(Update.model_validate(data), ME), Ask)
