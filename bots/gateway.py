"""The gateway: one FastAPI app that hosts every channel's routes and background work."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Protocol

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from bots.edge import BodyCaps, CachedProbe

log = logging.getLogger(__name__)


class Channel(Protocol):
    """A chat channel plugged into the gateway: HTTP routes plus start/stop of background work."""

    name: str

    def routes(self) -> APIRouter | None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


ReadyCheck = Callable[[], Awaitable[dict[str, str]]]


class ChannelStartError(RuntimeError):
    """A channel could not start (its platform unreachable, a bad token); says which and why."""


@contextlib.contextmanager
def steady_gc(gen0_threshold: int = 7000) -> Iterator[None]:
    """While the gateway serves: what start-up loaded (modules, the tokenizer, the model) is
    frozen out of the garbage collector's reach, and the youngest generation is collected
    every 7,000 allocations instead of 700; both undone at shutdown.

    Measured with benchmarks/telegram.py (webhook on PostgreSQL, 1,000 updates): collections
    took 0.6-1.2 s of the gateway's 7-9 s of CPU, the full ones walking some 570,000 start-up
    objects each time; frozen and less often, 0.05-0.08 s.
    """
    old = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(gen0_threshold, *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def create_app(*, channels: Sequence[Channel], ready: ReadyCheck,
               on_shutdown: Callable[[], Awaitable[None]] | None = None,
               ready_cache_s: float = 5.0) -> FastAPI:
    """`ready` returns {component: "ok" | terse reason}; /readyz is 200 only when all are
    "ok", and runs `ready` at most once per `ready_cache_s`. Request bodies are capped per
    path prefix (bots.edge.BODY_CAPS); no OpenAPI schema or docs are served."""
    probe = CachedProbe(ready, ttl_s=ready_cache_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started: list[Channel] = []
        try:
            for ch in channels:
                try:
                    await ch.start()
                except Exception as exc:  # reported in one line by `chatloop serve`
                    app.state.startup_error = f"channel {ch.name} could not start: {exc}"
                    with contextlib.suppress(Exception):
                        await ch.stop()  # release what it opened (client sessions)
                    raise ChannelStartError(app.state.startup_error) from None
                started.append(ch)
                log.info("channel %s started", ch.name)
            with steady_gc():
                yield
        finally:
            for ch in reversed(started):
                await ch.stop()
            if on_shutdown is not None:
                await on_shutdown()

    app = FastAPI(title="chatloop gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(BodyCaps)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        checks = await probe()
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)

    for ch in channels:
        router = ch.routes()
        if router is not None:
            app.include_router(router)
    return app
