"""OpenAIBackend's streaming path against a scripted OpenAI-compatible server on loopback:
server-sent events parsed as they arrive, retries before the first byte only, errors typed."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from inference.base import ChatMessage, Finished, GenerationRequest, TextDelta
from inference.errors import (
    AdapterNotFound,
    BackendUnavailable,
    ContextTooLong,
    InferenceError,
    RateLimited,
)
from inference.openai_backend import OpenAIBackend
from tests.fakes.inference import collect
from tests.fakes.servers import serve_app

Reply = Callable[[dict[str, Any]], Response]
QUESTION = [ChatMessage("user", "How long is the return window?")]


def chunk(**fields: Any) -> str:
    return "data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", **fields})


def stream(*events: str) -> Reply:
    """A 200 streaming these events; CRLF line ends, a comment and an `event:` field, as a
    proxy in front of vLLM may send them."""

    def reply(_: dict[str, Any]) -> Response:
        async def body() -> AsyncIterator[str]:
            yield ": keep-alive\r\n\r\n"
            for e in events:
                yield f"event: message\r\n{e}\r\n\r\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    return reply


def tokens(*words: str, usage: bool = True) -> Reply:
    events = [chunk(choices=[{"index": 0, "delta": {"content": w}, "finish_reason": None}])
              for w in words]
    events.append(chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "length"}]))
    if usage:
        events.append(chunk(choices=[], usage={"prompt_tokens": 7,
                                               "completion_tokens": len(words)}))
    return stream(*events, "data: [DONE]")


def status(code: int, body: dict[str, Any], **headers: str) -> Reply:
    return lambda _: JSONResponse(body, status_code=code, headers=headers)


class Scripted:
    """Answers each chat request with the next reply of its script; records the requests."""

    def __init__(self) -> None:
        self.script: list[Reply] = []
        self.requests: list[tuple[dict[str, Any], dict[str, str]]] = []

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append((body, dict(request.headers)))
        return self.script.pop(0)(body)


@contextlib.asynccontextmanager
async def scripted(**options: Any) -> AsyncIterator[tuple[Scripted, OpenAIBackend]]:
    server = Scripted()
    app = Starlette(routes=[Route("/v1/chat/completions", server.chat, methods=["POST"])])
    async with serve_app(app) as url:
        backend = OpenAIBackend(base_url=f"{url}/v1", model_name="chatloop-base",
                                api_key="secret", **options)
        try:
            yield server, backend
        finally:
            await backend.aclose()


async def test_an_answer_streams_token_by_token_and_ends_with_its_usage() -> None:
    async with scripted(extra_body={"ignore_eos": True}) as (server, backend):
        server.script = [tokens("You have ", "45 days", ".")]
        seen = []
        async for event in backend.stream(GenerationRequest(QUESTION, max_tokens=16,
                                                            adapter="fb-v2", seed=3)):
            seen.append(event)
        assert [e.text for e in seen if isinstance(e, TextDelta)] == ["You have ", "45 days", "."]
        assert seen[-1] == Finished("length", 7, 3)
        body, headers = server.requests[0]
        assert body["model"] == "fb-v2" and body["seed"] == 3 and body["ignore_eos"] is True
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["messages"] == [{"role": "user", "content": QUESTION[0].content}]
        assert headers["authorization"] == "Bearer secret"


async def test_failures_before_the_first_byte_are_retried() -> None:
    async with scripted(max_retries=2) as (server, backend):
        server.script = [status(503, {"message": "loading"}, **{"retry-after": "0.01"}),
                         status(500, {"message": "oops"}, **{"retry-after": "0.01"}),
                         tokens("fine")]
        assert (await collect(backend, GenerationRequest(QUESTION, 16)))[0] == "fine"
        assert len(server.requests) == 3

        server.requests.clear()
        server.script = [status(429, {"message": "slow down"}, **{"retry-after": "0.02"})] * 3
        with pytest.raises(RateLimited) as limited:
            await collect(backend, GenerationRequest(QUESTION, 16))
        assert limited.value.retry_after == 0.02 and len(server.requests) == 3

        server.script = [status(503, {"message": "down"}, **{"retry-after": "0.01"})] * 3
        with pytest.raises(BackendUnavailable, match="503"):
            await collect(backend, GenerationRequest(QUESTION, 16))


@pytest.mark.parametrize(("code", "body", "adapter", "error"), [
    (400, {"object": "error", "message": "This model's maximum context length is 2048 tokens",
           "type": "BadRequestError", "code": 400}, None, ContextTooLong),
    (400, {"error": {"message": "The model `fb-v9` does not exist.", "code": 400}}, "fb-v9",
     AdapterNotFound),
    (404, {"message": "The model `fb-v9` does not exist."}, "fb-v9", AdapterNotFound),
    (404, {"message": "The model `chatloop-base` does not exist."}, None, BackendUnavailable),
    (400, {"message": "temperature must be non-negative"}, None, InferenceError),
    (401, {"error": {"message": "bad key"}}, None, BackendUnavailable),
])
async def test_error_answers_are_typed_and_not_retried(
        code: int, body: dict[str, Any], adapter: str | None,
        error: type[InferenceError]) -> None:
    async with scripted(max_retries=2) as (server, backend):
        server.script = [status(code, body)]
        with pytest.raises(error) as raised:
            await collect(backend, GenerationRequest(QUESTION, 16, adapter=adapter))
        assert type(raised.value) is error and len(server.requests) == 1


async def test_a_stream_broken_after_its_first_token_is_not_retried() -> None:
    async with scripted(max_retries=2) as (server, backend):
        server.script = [stream(chunk(choices=[{"index": 0, "delta": {"content": "Yes"}}]),
                                chunk(error={"message": "engine died", "code": 500}))]
        got = []
        with pytest.raises(BackendUnavailable, match="engine died"):
            async for event in backend.stream(GenerationRequest(QUESTION, 16)):
                got.append(event)
        assert got == [TextDelta("Yes")] and len(server.requests) == 1

        server.script = [tokens("cut", usage=False)]  # [DONE] without the usage chunk
        with pytest.raises(BackendUnavailable, match="without usage"):
            await collect(backend, GenerationRequest(QUESTION, 16))


async def test_a_stream_left_early_frees_its_connection() -> None:
    async with scripted(max_retries=0) as (server, backend):
        server.script = [tokens(*(f"w{i} " for i in range(50)))] * 2 + [tokens("again")]
        for _ in range(2):
            async with contextlib.aclosing(backend.stream(GenerationRequest(QUESTION, 16))) as s:
                async for event in s:
                    assert event == TextDelta("w0 ")
                    break
        assert (await collect(backend, GenerationRequest(QUESTION, 16)))[0] == "again"


async def test_an_error_answer_to_the_sdk_is_typed_as_a_stream_s() -> None:
    async with scripted() as (_, backend):  # the scripted server has no /v1/models
        with pytest.raises(BackendUnavailable, match="missing"):
            await backend.list_adapters()


async def test_an_unreachable_server_is_unavailable_after_the_retries() -> None:
    backend = OpenAIBackend(base_url="http://127.0.0.1:9/v1", model_name="chatloop-base",
                            max_retries=1, connect_timeout=1)
    try:
        with pytest.raises(BackendUnavailable, match="unavailable"):
            await collect(backend, GenerationRequest(QUESTION, 16))
    finally:
        await backend.aclose()
