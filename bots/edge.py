"""What every request passes before a route reads it: a body cap per path prefix, and a
readiness probe that is cached so unauthenticated callers cannot make it run at will.

The caps are Starlette's `RequestBodyLimitMiddleware`, one per size, chosen by the longest
matching path prefix: a declared `Content-Length` over the cap is refused (413) before a
byte is read, a chunked body as soon as it passes the cap. New routes (the operators'
console, say) get their prefix's cap, or the default, without touching their code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

KIB = 1024
# Telegram updates and Slack events are a few KiB; their platforms send nothing near 1 MiB.
# The web chat's largest legitimate body is a correction of 8,000 characters, JSON-escaped.
BODY_CAPS: Mapping[str, int] = {
    "/telegram/": 1024 * KIB,
    "/slack/": 1024 * KIB,
    "/api/": 256 * KIB,
    "/console": 256 * KIB,
}
DEFAULT_BODY_CAP = 64 * KIB


class BodyCaps:
    """ASGI middleware: each request's body is capped by its path's longest matching prefix."""

    def __init__(self, app: ASGIApp, *, caps: Mapping[str, int] = BODY_CAPS,
                 default: int = DEFAULT_BODY_CAP) -> None:
        self._prefixes = sorted(caps.items(), key=lambda item: -len(item[0]))
        self._default = default
        self._limited = {cap: RequestBodyLimitMiddleware(app, max_body_size=cap)
                         for cap in {*caps.values(), default}}

    def cap_for(self, path: str) -> int:
        return next((cap for prefix, cap in self._prefixes if path.startswith(prefix)),
                    self._default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cap = self.cap_for(scope["path"]) if scope["type"] == "http" else self._default
        await self._limited[cap](scope, receive, send)


ReadyCheck = Callable[[], Awaitable[dict[str, str]]]


class CachedProbe:
    """`probe` run at most once per `ttl_s` seconds; concurrent callers share one run."""

    def __init__(self, probe: ReadyCheck, *, ttl_s: float) -> None:
        self._probe, self._ttl = probe, ttl_s
        self._result: dict[str, str] | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def __call__(self) -> dict[str, str]:
        async with self._lock:
            if self._result is None or time.monotonic() - self._at >= self._ttl:
                self._result = await self._probe()
                self._at = time.monotonic()
            return dict(self._result)
