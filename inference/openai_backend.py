"""A streaming client for any OpenAI-compatible server (vLLM).

Answers stream over aiohttp, parsed as they arrive (server-sent events, one JSON chunk per
token or so): the `openai` SDK built a pydantic object per chunk and used 9 ms of the
gateway's CPU for a 32-token answer, against 1 ms here (benchmarks/core_overhead.py, which
also sends the same requests through the SDK). Connection errors, timeouts, 408, 409, 429 and
5xx are retried before the first byte of a stream, `max_retries` times with the SDK's backoff
(0.5 s doubling up to 8 s, or the server's Retry-After up to 60 s). A stream broken after
that is not retried (the user has already seen part of the answer); it raises
BackendUnavailable. The health probe and the adapter list, rare and small, use the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import openai

from inference.adapters import validate_adapter
from inference.base import Finished, GenerationRequest, StreamEvent, TextDelta, chat_dicts
from inference.errors import (
    AdapterNotFound,
    AdapterRejected,
    BackendUnavailable,
    ContextTooLong,
    InferenceError,
    RateLimited,
)


def map_error(exc: Exception, *, adapter: str | None = None) -> InferenceError:
    """Translate an `openai` / `httpx` exception into the inference error tree."""
    if isinstance(exc, InferenceError):
        return exc
    if isinstance(exc, openai.APIStatusError):  # an error response: read as a stream's is
        return status_error(exc.status_code, exc.response.content, adapter=adapter,
                            retry_after=exc.response.headers.get("retry-after"))
    if isinstance(exc, openai.APIConnectionError):
        return BackendUnavailable(f"inference server unavailable: {type(exc).__name__}")
    if isinstance(exc, (httpx.HTTPError, openai.APIError, asyncio.TimeoutError)):
        return BackendUnavailable(f"inference stream failed: {type(exc).__name__}: {exc}")
    return InferenceError(f"{type(exc).__name__}: {exc}")


RETRIED = frozenset({408, 409, 429})  # and every 5xx: the statuses the SDK retries


def _backoff_s(attempt: int, retry_after: str | None) -> float:
    """The SDK's wait before retry `attempt` (0-based): the server's Retry-After if it gives
    a sensible one, else 0.5 s doubling up to 8 s, less up to a quarter at random."""
    with contextlib.suppress(TypeError, ValueError):
        if retry_after is not None and 0 < (after := float(retry_after)) <= 60:
            return after
    return min(0.5 * 2 ** attempt, 8.0) * (1 - 0.25 * random.random())


def status_error(status: int, body: bytes, *, adapter: str | None,
                 retry_after: str | None = None) -> InferenceError:
    """Translate an error response (vLLM's body, `{"message": ...}` or OpenAI's
    `{"error": {"message": ...}}`) into the inference error tree; `map_error` uses it for the
    SDK's status errors too."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    error = data.get("error", data) if isinstance(data, dict) else None
    message = str(error.get("message") if isinstance(error, dict) and error.get("message")
                  else body[:300].decode("utf-8", "replace") or f"HTTP {status}")
    if status == 429:
        with contextlib.suppress(TypeError, ValueError):
            return RateLimited(message, retry_after=float(retry_after))  # type: ignore[arg-type]
        return RateLimited(message, retry_after=None)
    if status == 404:
        if adapter is not None:
            return AdapterNotFound(f"adapter {adapter!r} is not loaded on the server")
        return BackendUnavailable(f"the served model is missing: {message}")
    if status == 400:
        # vLLM reports an over-long prompt as a plain 400; its text is the only marker
        if "context length" in message or "maximum input length" in message:
            return ContextTooLong(message)
        if adapter is not None and "does not exist" in message:
            return AdapterNotFound(f"adapter {adapter!r} is not loaded on the server")
        return InferenceError(message)
    if status >= 500:
        return BackendUnavailable(f"inference server unavailable: HTTP {status}: {message}")
    return BackendUnavailable(f"inference stream failed: HTTP {status}: {message}")


async def _events(lines: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The data of each server-sent event, as the lines arrive."""
    data: list[bytes] = []
    async for raw in lines:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                yield b"\n".join(data)
                data = []
            continue
        field, _, value = line.partition(b":")
        if field == b"data":
            data.append(value[1:] if value.startswith(b" ") else value)
    if data:
        yield b"\n".join(data)


class OpenAIBackend:
    """Streams from an OpenAI-compatible `/v1` endpoint; adapters are chosen by model name."""

    def __init__(
        self,
        *,
        base_url: str,
        model_name: str,
        api_key: str = "EMPTY",
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_retries: int = 2,
        max_lora_rank: int = 16,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.model_name = model_name
        self._extra_body = extra_body  # server-specific sampling options (vLLM: ignore_eos...)
        self.base_url = base_url.rstrip("/")
        self._max_lora_rank = max_lora_rank
        # the openai client's own Timeout: its HTTP library (httpx2) rejects httpx's
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=api_key, max_retries=max_retries,
            timeout=openai.Timeout(read_timeout, connect=connect_timeout),
        )
        self._max_retries = max_retries
        self._stream_timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout,
                                                     sock_read=read_timeout)
        self._api_key = api_key
        self._streams: aiohttp.ClientSession | None = None  # made in the running loop
        self._streams_loop: asyncio.AbstractEventLoop | None = None
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            headers={"Authorization": f"Bearer {api_key}"},
        )
        self._adapter_lock = asyncio.Lock()  # vLLM's load/unload race (RELIABILITY.md §1)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        body: dict[str, Any] = {
            "model": request.adapter or self.model_name,
            "messages": chat_dicts(request.messages),
            "max_tokens": request.max_tokens, "temperature": request.temperature,
            "stream": True, "stream_options": {"include_usage": True},
        }
        if request.seed is not None:
            body["seed"] = request.seed
        body.update(self._extra_body or {})
        finish_reason, usage = "stop", None
        try:
            async with self._response(body, request.adapter) as response:
                async for data in _events(response.content):
                    if data == b"[DONE]":
                        break
                    chunk = json.loads(data)
                    if not isinstance(chunk, dict):
                        raise BackendUnavailable(f"inference stream sent {data[:100]!r}")
                    if error := chunk.get("error"):
                        message = error.get("message") if isinstance(error, dict) else error
                        raise BackendUnavailable(f"inference stream failed: {message}")
                    if chunk.get("usage") is not None:
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        if content := (choice.get("delta") or {}).get("content"):
                            yield TextDelta(content)
                        if choice.get("finish_reason"):
                            finish_reason = choice["finish_reason"]
        except InferenceError:
            raise
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise BackendUnavailable(
                f"inference stream failed: {type(exc).__name__}: {exc}") from exc
        if usage is None:
            raise BackendUnavailable("stream ended without usage: the server closed it early")
        yield Finished(finish_reason, usage["prompt_tokens"], usage["completion_tokens"])

    @contextlib.asynccontextmanager
    async def _response(self, body: dict[str, Any],
                        adapter: str | None) -> AsyncIterator[aiohttp.ClientResponse]:
        """The streaming response to a chat request, retried until its first byte."""
        streams = self._session()
        for attempt in range(self._max_retries + 1):
            last = attempt == self._max_retries
            try:
                response = await streams.post(f"{self.base_url}/chat/completions", json=body)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if last:
                    raise BackendUnavailable(
                        f"inference server unavailable: {type(exc).__name__}: {exc}") from exc
                await asyncio.sleep(_backoff_s(attempt, None))
                continue
            if response.status == 200:
                try:
                    yield response
                finally:
                    response.release()  # a stream left early is closed: vLLM stops it
                return
            async with response:
                error_body = await response.read()
            retry_after = response.headers.get("retry-after")
            if last or (response.status not in RETRIED and response.status < 500):
                raise status_error(response.status, error_body, adapter=adapter,
                                   retry_after=retry_after)
            await asyncio.sleep(_backoff_s(attempt, retry_after))

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._streams is None or self._streams.closed or self._streams_loop is not loop:
            self._streams_loop = loop  # a session serves the loop it was made in only
            self._streams = aiohttp.ClientSession(
                timeout=self._stream_timeout,
                headers={"Authorization": f"Bearer {self._api_key}"},
                connector=aiohttp.TCPConnector(limit=1000))  # as the SDK's pool
        return self._streams

    async def health(self) -> None:
        root = self.base_url.removesuffix("/v1")
        try:
            r = await self._http.get(f"{root}/health")
            if r.status_code != 200:
                raise BackendUnavailable(f"{root}/health answered {r.status_code}")
            await self._client.with_options(max_retries=0).completions.create(
                model=self.model_name, prompt="ping", max_tokens=1
            )
        except InferenceError:
            raise
        except Exception as exc:
            raise map_error(exc) from exc

    async def load_adapter(self, name: str, path: str) -> None:
        validate_adapter(path, max_rank=self._max_lora_rank)
        async with self._adapter_lock:
            await self._post("/load_lora_adapter", {"lora_name": name, "lora_path": path}, name)

    async def unload_adapter(self, name: str) -> None:
        async with self._adapter_lock:
            await self._post("/unload_lora_adapter", {"lora_name": name}, name)

    async def list_adapters(self) -> list[str]:
        try:
            models = await self._client.models.list()
        except Exception as exc:
            raise map_error(exc) from exc
        return [m.id for m in models.data if m.id != self.model_name]

    async def _post(self, path: str, body: dict[str, str], name: str) -> None:
        try:
            r = await self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"{path}: {type(exc).__name__}") from exc
        if r.status_code == 404:
            raise AdapterNotFound(f"adapter {name!r}: {r.text[:200]}")
        if r.status_code >= 500:
            raise BackendUnavailable(f"{path} answered {r.status_code}: {r.text[:200]}")
        if r.status_code >= 400:
            raise AdapterRejected(f"{path} refused {name!r}: {r.text[:300]}")

    async def aclose(self) -> None:
        await self._client.close()
        await self._http.aclose()
        if self._streams is not None:
            await self._streams.close()
