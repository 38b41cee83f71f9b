"""The one streaming interface every inference backend implements."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

ChatRole = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: ChatRole
    content: str


def chat_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """Messages as chat templates and the OpenAI API take them."""
    return [{"role": m.role, "content": m.content} for m in messages]


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A chat completion request; `adapter` None means the base model. `conversation_id`, if
    given, keeps a conversation on one server where there are several (warm prefix caches)."""

    messages: Sequence[ChatMessage]
    max_tokens: int
    adapter: str | None = None
    temperature: float = 0.0
    seed: int | None = None
    conversation_id: int | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of every successful stream."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


StreamEvent = TextDelta | Finished


class InferenceBackend(Protocol):
    """Streams chat completions from the base model or a named LoRA adapter.

    `stream` yields TextDelta events then exactly one Finished, or raises an
    `inference.errors.InferenceError` subclass. Adapter names are chosen by the
    caller and never reused for different weights.
    """

    model_name: str

    def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]: ...

    async def health(self) -> None:
        """Raise BackendUnavailable unless the backend can generate right now."""

    async def load_adapter(self, name: str, path: str) -> None:
        """Make the peft adapter at `path` servable as `name`."""

    async def unload_adapter(self, name: str) -> None: ...

    async def list_adapters(self) -> list[str]: ...

    async def aclose(self) -> None: ...
