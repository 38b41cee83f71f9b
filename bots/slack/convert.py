"""Pure converters from Slack payloads (Events API, interactivity) to chatloop values."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bots.core import InboundMessage, identity
from bots.slack.render import CORRECTION_BLOCK, CORRECTION_INPUT

CHANNEL = "slack"
# message subtypes that are a person writing; edits, deletions, joins, bots are not
_HUMAN_SUBTYPES = {None, "file_share", "thread_broadcast"}


class Kind(StrEnum):
    MENTION = "mention"  # app_mention: always answered
    DIRECT = "direct"  # a DM to the bot: always answered
    THREAD = "thread"  # a message in a channel thread: answered if the bot is in that thread


@dataclass(frozen=True, slots=True)
class Inbound:
    """A Slack message the bot may answer, with what the reply needs besides the core's fields."""

    kind: Kind
    message: InboundMessage
    team_id: str | None


def user_key(team: str | None, user: str) -> str:
    """A Slack user's id within the channel, `TEAM/USER` (user ids are only unique within
    their workspace); the bare user id if no team is known."""
    return f"{team}/{user}" if team else user


def split_user(user_id: str) -> tuple[str | None, str]:
    """(team, user) of a `user_key` (team None for a bare id, as events recorded before
    identities carried the team)."""
    team, sep, user = user_id.partition("/")
    return (team, user) if sep else (None, user_id)


def voter(body: dict[str, Any]) -> str:
    """The identity of the person who clicked or submitted (interactivity payloads name the
    team in `user.team_id`, or else in `team.id`); empty if the payload names no user."""
    user = body.get("user") or {}
    if not user.get("id"):
        return ""
    team = user.get("team_id") or (body.get("team") or {}).get("id")
    return identity(CHANNEL, user_key(team, user["id"]))


def _event_team(body: dict[str, Any], event: dict[str, Any]) -> str | None:
    """The author's team: the event's own fields first (shared channels, Enterprise Grid),
    then the envelope's."""
    auths = body.get("authorizations") or [{}]
    return (event.get("user_team") or event.get("team") or body.get("team_id")
            or auths[0].get("team_id"))


def strip_mention(text: str, bot_user_id: str | None) -> str:
    if bot_user_id:
        text = re.sub(rf"<@{re.escape(bot_user_id)}(\|[^>]*)?>", " ", text)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def inbound(body: dict[str, Any], *, bot_user_id: str | None) -> Inbound | None:
    """The message in an event_callback, or None if it is not one to answer (S2-S3).

    Ignored: the bot's own and other bots' messages, edits, deletions and other subtypes,
    and channel `message` events that mention the bot (the `app_mention` twin answers).
    A conversation is a thread: (channel, thread_ts), or the message's own ts at the top.
    """
    event = body.get("event") or {}
    etype, user = event.get("type"), event.get("user")
    if not user or event.get("bot_id") or event.get("subtype") not in _HUMAN_SUBTYPES:
        return None
    if user == bot_user_id or event.get("hidden"):
        return None
    if etype == "app_mention":
        kind = Kind.MENTION
    elif etype == "message" and event.get("channel_type") == "im":
        kind = Kind.DIRECT
    elif etype == "message" and event.get("thread_ts"):
        if bot_user_id and f"<@{bot_user_id}" in (event.get("text") or ""):
            return None
        kind = Kind.THREAD
    else:
        return None
    ts = event.get("ts") or event.get("event_ts") or ""
    team = _event_team(body, event)
    msg = InboundMessage(
        channel=CHANNEL, event_id=str(body.get("event_id") or f"{event.get('channel')}:{ts}"),
        chat_id=event.get("channel") or "", user_id=user_key(team, user),
        text=strip_mention(event.get("text") or "", bot_user_id),
        thread_id=event.get("thread_ts") or ts, message_id=ts,
    )
    return Inbound(kind, msg, team)


@dataclass(frozen=True, slots=True)
class Click:
    """A feedback button pressed under an answer."""

    answer_id: int
    voter_id: str  # an identity: slack:TEAM/USER
    channel_id: str
    message_ts: str
    message: dict[str, Any]
    trigger_id: str


def click(body: dict[str, Any]) -> Click | None:
    """The button press in a block_actions payload, or None if it is not one of ours."""
    actions = body.get("actions") or []
    try:
        answer_id = int(actions[0]["value"])
    except (IndexError, KeyError, TypeError, ValueError):
        return None
    container = body.get("container") or {}
    message = body.get("message") or {}
    return Click(
        answer_id=answer_id, voter_id=voter(body),
        channel_id=container.get("channel_id") or (body.get("channel") or {}).get("id", ""),
        message_ts=container.get("message_ts") or message.get("ts", ""),
        message=message, trigger_id=body.get("trigger_id", ""),
    )


@dataclass(frozen=True, slots=True)
class Suggestion:
    """A submitted "Suggest a better answer" modal."""

    answer_id: int
    voter_id: str  # an identity: slack:TEAM/USER
    text: str


def suggestion(body: dict[str, Any]) -> Suggestion | None:
    """The correction in a view_submission payload, or None if the view is not ours."""
    view = body.get("view") or {}
    try:
        answer_id = int(json.loads(view.get("private_metadata") or "{}")["answer_id"])
    except (KeyError, TypeError, ValueError):
        return None
    values = (view.get("state") or {}).get("values") or {}
    text = ((values.get(CORRECTION_BLOCK) or {}).get(CORRECTION_INPUT) or {}).get("value") or ""
    return Suggestion(answer_id, voter(body), text.strip())
