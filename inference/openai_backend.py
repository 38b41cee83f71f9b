"""A streaming client for any OpenAI-compatible server (vLLM), built on the `openai` SDK.

The SDK is the one retry owner: it retries connection errors, 429 and 5xx before
the first byte of a stream. A stream broken after that is not retried (the user
has already seen part of the answer); it raises BackendUnavailable.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai

from inference.adapters import validate_adapter
from inference.base import Finished, GenerationRequest, StreamEvent, TextDelta
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
    if isinstance(exc, openai.RateLimitError):
        retry = exc.response.headers.get("retry-after")
        return RateLimited(str(exc), retry_after=float(retry) if retry else None)
    if isinstance(exc, openai.NotFoundError):
        if adapter is not None:
            return AdapterNotFound(f"adapter {adapter!r} is not loaded on the server")
        return BackendUnavailable(f"the served model is missing: {exc}")
    if isinstance(exc, openai.BadRequestError):
        body = exc.body if isinstance(exc.body, dict) else {}
        message = str(body.get("message") or exc)
        # vLLM reports an over-long prompt as a plain 400; its text is the only marker
        if "context length" in message or "maximum input length" in message:
            return ContextTooLong(message)
        if adapter is not None and "does not exist" in message:
            return AdapterNotFound(f"adapter {adapter!r} is not loaded on the server")
        return InferenceError(message)
    if isinstance(exc, (openai.APIConnectionError, openai.InternalServerError)):
        return BackendUnavailable(f"inference server unavailable: {type(exc).__name__}")
    if isinstance(exc, (httpx.HTTPError, openai.APIError, asyncio.TimeoutError)):
        return BackendUnavailable(f"inference stream failed: {type(exc).__name__}: {exc}")
    return InferenceError(f"{type(exc).__name__}: {exc}")


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
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=max_retries
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {api_key}"},
        )
        self._adapter_lock = asyncio.Lock()  # vLLM's load/unload race (RELIABILITY.md §1)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        kwargs: dict[str, Any] = {"extra_body": self._extra_body} if self._extra_body else {}
        if request.seed is not None:
            kwargs["seed"] = request.seed
        try:
            chunks = await self._client.chat.completions.create(
                model=request.adapter or self.model_name,
                messages=[{"role": m.role, "content": m.content} for m in request.messages],
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                stream=True,
                stream_options={"include_usage": True},
                **kwargs,
            )
            finish_reason = "stop"
            usage = None
            async with chunks:
                async for chunk in chunks:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices:
                        if choice.delta.content:
                            yield TextDelta(choice.delta.content)
                        if choice.finish_reason:
                            finish_reason = choice.finish_reason
        except Exception as exc:  # mapped in one place, re-raised typed
            raise map_error(exc, adapter=request.adapter) from exc
        if usage is None:
            raise BackendUnavailable("stream ended without usage: the server closed it early")
        yield Finished(finish_reason, usage.prompt_tokens, usage.completion_tokens)

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
