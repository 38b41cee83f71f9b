"""Telegram updates -> what the channel should do: pure functions, no network.

Who is answered: every text message in a private chat; in groups only messages that mention
the bot, reply to one of its messages, or are commands addressed to it. Forum topics are
separate conversations. Replies to the bot's correction prompt are corrections.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass

from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup, Message, Update, User

from bots.core import InboundMessage, identity
from bots.telegram.outbound import Target

CHANNEL = "telegram"
UPDATE_TYPES = ["message", "edited_message", "callback_query"]
MEDIA = frozenset({
    "photo", "video", "audio", "voice", "document", "animation", "video_note", "sticker",
    "location", "venue", "contact", "poll", "dice", "game", "story", "live_photo",
    "paid_media",
})
TEXT_ONLY = "I can only read text messages. Please type your question."
_VOTE = re.compile(r"v:(\d{1,19}):([ud])")
_FIX_LINK = re.compile(r"\?start=fix_(\d{1,19})$")


@dataclass(frozen=True, slots=True)
class Ask:
    """A message for the conversation core (questions and commands)."""

    message: InboundMessage
    where: Target


@dataclass(frozen=True, slots=True)
class Vote:
    update_id: int
    query_id: str
    answer_id: int
    rating: int
    voter_id: str  # an identity: telegram:USER
    where: Target | None  # None when the answer's message is no longer accessible
    answer_message_id: int | None


@dataclass(frozen=True, slots=True)
class Correct:
    update_id: int
    answer_id: int
    voter_id: str  # an identity: telegram:USER
    text: str
    where: Target


@dataclass(frozen=True, slots=True)
class TextOnly:
    """Media in a private chat: say that only text is read."""

    update_id: int
    where: Target


@dataclass(frozen=True, slots=True)
class StaleButton:
    """A callback this bot does not understand: answer it and do nothing else."""

    query_id: str


@dataclass(frozen=True, slots=True)
class Skip:
    why: str


Action = Ask | Vote | Correct | TextOnly | StaleButton | Skip


def lane(action: Action) -> Hashable | None:
    """Actions with the same lane run in order; None runs nowhere (nothing to do)."""
    if isinstance(action, Ask):
        m = action.message
        return ("chat", m.chat_id, m.thread_id)
    if isinstance(action, Correct | TextOnly):
        return ("chat", str(action.where.chat_id), str(action.where.thread_id or ""))
    if isinstance(action, Vote):
        return ("votes", action.voter_id)  # a changed vote must land after the first one
    if isinstance(action, StaleButton):
        return ("votes", action.query_id)
    return None


def classify(update: Update, me: User) -> Action:
    """Decide what one update asks of the bot (`me` is the bot's own user, from getMe)."""
    if update.callback_query is not None:
        return _callback(update, me)
    if update.edited_message is not None:
        return Skip("edited message: the original was already handled")
    msg = update.message
    if msg is None:
        return Skip(f"update type {update.event_type} is not handled")
    if msg.from_user is None or msg.from_user.is_bot or msg.chat.type == "channel":
        return Skip("not from a person")
    private = msg.chat.type == "private"
    if msg.text is None:
        if private and msg.content_type in MEDIA:
            return TextOnly(update.update_id, _target(msg))
        return Skip("no text")
    fixed = correction_target(msg, me)
    if fixed is not None:
        return Correct(update.update_id, fixed, identity(CHANNEL, str(msg.from_user.id)),
                       msg.text, _target(msg))
    text = msg.text if private else _addressed_text(msg, me)
    if text is None:
        return Skip("group message not addressed to the bot")
    thread = msg.message_thread_id if msg.is_topic_message else None
    inbound = InboundMessage(
        channel=CHANNEL, event_id=str(update.update_id), chat_id=str(msg.chat.id),
        user_id=str(msg.from_user.id), text=text, thread_id=str(thread or ""),
        message_id=str(msg.message_id),
    )
    return Ask(inbound, _target(msg))


def target_for(msg: InboundMessage) -> Target:
    """Where to answer a recorded message (used when resuming after a restart)."""
    return Target(int(msg.chat_id), int(msg.thread_id) if msg.thread_id else None,
                  int(msg.message_id) if msg.message_id else None)


def _target(msg: Message) -> Target:
    thread = msg.message_thread_id if msg.is_topic_message else None
    return Target(msg.chat.id, thread, msg.message_id)


def _addressed_text(msg: Message, me: User) -> str | None:
    """The text meant for the bot in a group message, or None if it is not for the bot."""
    text = msg.text or ""
    name = (me.username or "").lower()
    if text.startswith("/"):
        _, _, at = text.split(maxsplit=1)[0].partition("@")
        return text if not at or at.lower() == name else None
    mentioned = any(
        (e.type == "mention" and e.extract_from(text).lower() == f"@{name}")
        or (e.type == "text_mention" and e.user is not None and e.user.id == me.id)
        for e in msg.entities or ()
    )
    replied = msg.reply_to_message
    to_bot = (replied is not None and replied.from_user is not None
              and replied.from_user.id == me.id and replied.forum_topic_created is None)
    if not (mentioned or to_bot):
        return None
    if not name:
        return text.strip()
    return re.sub(rf"@{re.escape(name)}\b", " ", text, flags=re.IGNORECASE).strip()


def _callback(update: Update, me: User) -> Action:
    query = update.callback_query
    assert query is not None
    found = _VOTE.fullmatch(query.data or "")
    if found is None:
        return StaleButton(query.id)
    message = query.message
    where = answer_msg = None
    if message is not None:
        thread = getattr(message, "message_thread_id", None)
        topic = getattr(message, "is_topic_message", None)
        where = Target(message.chat.id, thread if topic else None)
        answer_msg = message.message_id
    return Vote(update.update_id, query.id, int(found.group(1)),
                1 if found.group(2) == "u" else -1, identity(CHANNEL, str(query.from_user.id)),
                where, answer_msg)


HUMAN_BUTTON = "human"  # callback_data of "Talk to a person" (bots.telegram.handoff)


def vote_keyboard(answer_id: int, *, human: bool = False) -> InlineKeyboardMarkup:
    """👍 / 👎 under an answer; callback_data carries the stored answer id (≤ 23 bytes).
    `human`: a second row with "Talk to a person" (hand-off)."""
    rows = [[
        InlineKeyboardButton(text="👍", callback_data=f"v:{answer_id}:u"),
        InlineKeyboardButton(text="👎", callback_data=f"v:{answer_id}:d"),
    ]]
    if human:
        rows.append([InlineKeyboardButton(text="Talk to a person", callback_data=HUMAN_BUTTON)])
    return InlineKeyboardMarkup(inline_keyboard=rows)


def fix_link(answer_id: int, me: User) -> str:
    return f"https://t.me/{me.username or 'bot'}?start=fix_{answer_id}"


def correction_prompt(answer_id: int, me: User) -> str:
    """The HTML invitation sent after 👎; a reply to it is a correction of `answer_id`."""
    return (
        "Sorry that answer missed. If you know a better one, reply to this message with it "
        f'and I will learn from it (<a href="{fix_link(answer_id, me)}">answer #{answer_id}</a>).'
    )


def correction_target(msg: Message, me: User) -> int | None:
    """The answer id if `msg` replies to the bot's correction prompt.

    The prompt carries a link entity that model output can never contain (answers are
    rendered without links), so a quoted answer cannot pose as a prompt.
    """
    prompt = msg.reply_to_message
    if prompt is None or prompt.from_user is None or prompt.from_user.id != me.id:
        return None
    for entity in prompt.entities or ():
        if entity.type == "text_link" and entity.url:
            found = _FIX_LINK.search(entity.url)
            if found and entity.url == fix_link(int(found.group(1)), me):
                return int(found.group(1))
    return None
