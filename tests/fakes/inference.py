"""A scripted inference backend: real InferenceBackend behaviour, answers chosen by the test;
and `collect`, a backend's whole answer to one request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from inference.base import Finished, GenerationRequest, InferenceBackend, StreamEvent, TextDelta
from inference.errors import AdapterNotFound, InferenceError


async def collect(backend: InferenceBackend, request: GenerationRequest) -> tuple[str, Finished]:
    """The streamed text and the finish event of one request."""
    text, done = "", None
    async for ev in backend.stream(request):
        if isinstance(ev, TextDelta):
            text += ev.text
        else:
            done = ev
    assert done is not None
    return text, done


@dataclass
class ScriptedBackend:
    """Answers with `answer(request)` split into `chunk`-character deltas, `delay` s apart.

    `fail_after` raises `error` after that many deltas (mid-stream faults); `requests`
    records every request, so tests can check prompts, history and routing.
    """

    answer: Callable[[GenerationRequest], str] = lambda r: f"Echo: {r.messages[-1].content}"
    chunk: int = 8
    delay: float = 0.0
    first_token_delay: float = 0.0
    fail_after: int | None = None
    error: InferenceError = field(default_factory=lambda: InferenceError("scripted failure"))
    model_name: str = "scripted"
    adapters: set[str] = field(default_factory=set)
    requests: list[GenerationRequest] = field(default_factory=list)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        self.requests.append(request)
        if request.adapter is not None and request.adapter not in self.adapters:
            raise AdapterNotFound(f"adapter {request.adapter!r} is not loaded")
        text = self.answer(request)
        if self.first_token_delay:
            await asyncio.sleep(self.first_token_delay)
        pieces = [text[i : i + self.chunk] for i in range(0, len(text), self.chunk)]
        for n, piece in enumerate(pieces):
            if self.fail_after is not None and n >= self.fail_after:
                raise self.error
            if self.delay:
                await asyncio.sleep(self.delay)
            yield TextDelta(piece)
        yield Finished("stop", sum(len(m.content) for m in request.messages) // 4, len(pieces))

    async def health(self) -> None:
        return None

    async def load_adapter(self, name: str, path: str) -> None:
        self.adapters.add(name)

    async def unload_adapter(self, name: str) -> None:
        self.adapters.discard(name)

    async def list_adapters(self) -> list[str]:
        return sorted(self.adapters)

    async def aclose(self) -> None:
        return None
