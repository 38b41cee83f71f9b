"""The stored form of an inbound message (the event payload a resumed turn is rebuilt from).

Versioned, and read back through `load` alone, which accepts every version ever written:
renaming a field of `InboundMessage` then needs a new version here, never a migration of
stored events, and an event recorded by an older release still resumes.
"""

from __future__ import annotations

from typing import Any

from bots.core.types import InboundMessage

VERSION = 1


class UnreadablePayload(ValueError):
    """A stored payload this release cannot turn back into a message."""


def dump(msg: InboundMessage) -> dict[str, Any]:
    return {"v": VERSION, "channel": msg.channel, "event_id": msg.event_id,
            "chat_id": msg.chat_id, "user_id": msg.user_id, "text": msg.text,
            "thread_id": msg.thread_id, "message_id": msg.message_id}


def load(payload: dict[str, Any]) -> InboundMessage:
    """The message stored in `payload`, whichever version wrote it."""
    version = payload.get("v", 0)  # version 0: `dataclasses.asdict(msg)`, no version key
    if version not in (0, 1):
        raise UnreadablePayload(f"event payload version {version} is newer than this release")
    try:
        return InboundMessage(
            channel=payload["channel"], event_id=payload["event_id"], chat_id=payload["chat_id"],
            user_id=payload["user_id"], text=payload["text"],
            thread_id=payload.get("thread_id") or "", message_id=payload.get("message_id"))
    except KeyError as exc:
        raise UnreadablePayload(f"event payload lacks {exc.args[0]!r}") from exc
