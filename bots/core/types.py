"""The core's contract with channels: messages in, sinks out, typed results."""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from storage.conversations import TurnStart

# Channels whose conversations belong to the one person who asked (the web chat: each browser
# has its own): feedback there is accepted only on one's own answers.
PRIVATE_CHANNELS = frozenset({"web"})


def identity(channel: str, user: str) -> str:
    """A person as every part of chatloop knows them: `channel:id` (`telegram:111`,
    `slack:T0/U0ABC`, `web:<server-issued id>`). The one place identities are made: messages'
    authors, voters, rate limits, per-user caps and reviewer lists all use it."""
    if not channel or ":" in channel or not user:
        raise ValueError(f"no identity for channel {channel!r} and user {user!r}")
    return f"{channel}:{user}"


def channel_of(who: str) -> str:
    """The channel of an identity made by `identity`; ValueError for anything else."""
    channel, sep, user = who.partition(":")
    if not (channel and sep and user):
        raise ValueError(f"not an identity (channel:id): {who!r}")
    return channel


def clean_text(text: str) -> str:
    """`text` as every database stores it: NUL characters dropped (PostgreSQL refuses them)
    and lone surrogates (valid in JSON escapes, not in UTF-8) replaced by U+FFFD."""
    text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # pairs written as two code points become one character; a lone one U+FFFD
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A normalised message from any channel; `event_id` is the platform's delivery id and
    `user_id` the author's id within the channel (Slack: `TEAM/USER`). Its strings are
    cleaned on the way in (`clean_text`): whatever a platform or browser sent can be stored."""

    channel: str
    event_id: str
    chat_id: str
    user_id: str
    text: str
    thread_id: str = ""
    message_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("event_id", "chat_id", "user_id", "text", "thread_id", "message_id"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, clean_text(value))

    @property
    def author(self) -> str:
        """The author's identity (`channel:id`)."""
        return identity(self.channel, self.user_id)


@dataclass(frozen=True, slots=True)
class Resumed:
    """What `resume` tells a channel about the turn it asks a sink for."""

    event_id: int
    shown_ref: str | None  # the message already showing the answer before a crash, if any


class ReplySink(Protocol):
    """How the core talks to one reply on one platform (streaming-aware)."""

    async def begin(self) -> None:
        """Show that an answer is coming (typing indicator, placeholder)."""

    async def update(self, text: str) -> None:
        """The answer so far (the whole text, not a delta); the sink throttles itself."""

    async def finish(self, text: str, answer_id: int) -> str | None:
        """Show the exact final text with feedback controls; return the platform message id."""

    async def fail(self, text: str) -> None:
        """Replace the reply in progress with a short apology."""

    async def notice(self, text: str) -> None:
        """Send a short message that is not an answer (help, limits, bad input)."""


SinkFor = Callable[[InboundMessage, Resumed], Awaitable[ReplySink]]


class Router(Protocol):
    """Chooses the model route for a conversation: None is the base model, else an adapter."""

    async def route(self, conversation_id: int) -> str | None: ...


@dataclass(frozen=True, slots=True)
class StaticRouter:
    adapter: str | None = None

    async def route(self, conversation_id: int) -> str | None:
        return self.adapter


class Outcome(StrEnum):
    ANSWERED = "answered"
    FAILED = "failed"
    DUPLICATE = "duplicate"
    COMMAND = "command"
    REJECTED = "rejected"  # empty, oversized, rate-limited: told why, nothing generated
    ESCALATED = "escalated"  # a person was asked for (bots.core.handoff): no answer
    RELAYED = "relayed"  # a person holds the conversation: passed on to them, no answer


@dataclass(frozen=True, slots=True)
class HandoffView:
    """A conversation handed to a person, as channels need it (bots.core.handoff)."""

    id: int
    conversation_id: int
    channel: str
    chat_id: str  # where the user is
    thread_id: str
    user_id: str  # the user's identity
    status: str  # waiting, held, closed
    reason: str
    agent_chat: str | None = None  # where agents work on it (a Slack channel, a Telegram group)
    agent_ref: str | None = None  # the escalation message's ts, the forum topic's id
    agent_id: str | None = None  # the identity of the agent holding it
    agent_name: str | None = None
    new: bool = False  # just requested: the channel posts the escalation


@dataclass(frozen=True, slots=True)
class Relay:
    """A message to pass on during a hand-off (stored first: `message_id`)."""

    handoff: HandoffView
    message_id: int
    text: str
    author: str  # identity


@dataclass(frozen=True, slots=True)
class TurnResult:
    outcome: Outcome
    answer_id: int | None = None
    text: str = ""
    error_kind: str | None = None
    adapter: str | None = None  # the adapter that answered; None: the base model
    memory_entry_id: int | None = None  # answered with this answer-memory entry as it is
    handoff: HandoffView | None = None  # ESCALATED: the hand-off (new: post the escalation)
    relay: Relay | None = None  # RELAYED: what to pass on to the agents


@dataclass(frozen=True, slots=True)
class Accepted:
    """A question recorded by `ConversationCore.accept`, waiting for `ConversationCore.answer`."""

    turn: TurnStart
    question: str
    key: tuple[str, str, str]  # (channel, chat_id, thread_id): turns run in order per key


@dataclass(frozen=True, slots=True)
class FeedbackResult:
    """A vote or correction as stored, and whether its platform delivery was seen before."""

    id: int  # the feedback's id (what `chatloop review` approves or rejects)
    answer_id: int
    voter_id: str
    rating: int | None
    correction: str | None
    trusted: bool
    review_status: str | None
    first_delivery: bool
    # CHATLOOP_HANDOFF_AFTER_DOWNVOTES: this 👎 asked for a person (the channel tells the user
    # and posts the escalation)
    handoff: HandoffView | None = None


@dataclass(frozen=True, slots=True)
class CoreLimits:
    max_input_chars: int = 4000
    max_tokens: int = 256
    history_messages: int = 20
    rate_limit_per_minute: int = 20
    max_concurrent_generations: int = 32
    event_lease_s: float = 30.0  # a crashed process's turns are resumed elsewhere after this


def default_owner() -> str:
    """This process, as the owner of the events it works on (host and process id)."""
    return f"{socket.gethostname()}:{os.getpid()}"
