"""The core's contract with channels: messages in, sinks out, typed results."""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from storage.conversations import TurnStart


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A normalised message from any channel; `event_id` is the platform's delivery id."""

    channel: str
    event_id: str
    chat_id: str
    user_id: str
    text: str
    thread_id: str = ""
    message_id: str | None = None


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


@dataclass(frozen=True, slots=True)
class TurnResult:
    outcome: Outcome
    answer_id: int | None = None
    text: str = ""
    error_kind: str | None = None


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
