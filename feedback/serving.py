"""Serving adapters: the registry router (sticky canary slice) and backend reconciliation.

`RegistryRouter` plugs into the conversation core: a stable hash of the
conversation id puts a configurable percentage of conversations on the canary,
the rest on the active adapter (or the base model). `sync_adapters` makes a
backend serve what the registry says: active and canary adapters are (re)loaded
after a restart of the gateway or of vLLM; retired and rejected ones are
unloaded only after their in-flight requests have drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from feedback import registry
from inference.base import GenerationRequest, InferenceBackend, StreamEvent
from inference.errors import AdapterNotFound, AdapterRejected, InferenceError
from storage.models import AdapterStatus, utcnow

log = logging.getLogger(__name__)


def in_canary(conversation_id: int, canary: str, percent: float) -> bool:
    """Sticky: the same conversation always lands on the same side for one canary."""
    digest = hashlib.sha256(f"{canary}:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < percent * 100


class RegistryRouter:
    """Routes conversations from the registry's active/canary state, refreshed every `refresh_s`.

    Only the first request waits for the registry. Later refreshes run in the background
    while requests keep the routes they have: reading the registry and syncing the backend
    (listing adapters, loading a new one into vLLM) is never on a request's path. A new
    adapter is routed to only once the backend has loaded it.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, canary_percent: float,
                 refresh_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 backend: InferenceBackend | None = None,
                 drain_grace: timedelta = timedelta(seconds=60)) -> None:
        self._sessions = sessions
        self._drain_grace = drain_grace
        self._backend = backend  # if given, kept in sync with the registry at each refresh
        self._percent = canary_percent
        self._refresh_s = refresh_s
        self._clock = clock
        self._state: tuple[str | None, str | None] = (None, None)
        self._loaded_at: float | None = None
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def route(self, conversation_id: int) -> str | None:
        active, canary = await self._current()
        if canary is not None and in_canary(conversation_id, canary, self._percent):
            return canary
        return active

    def invalidate(self) -> None:
        self._loaded_at = None

    async def aclose(self) -> None:
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background

    async def _current(self) -> tuple[str | None, str | None]:
        if self._loaded_at is None:
            async with self._lock:
                if self._loaded_at is None:
                    await self._refresh()
        elif (self._clock() - self._loaded_at >= self._refresh_s
              and self._background is None):
            self._background = asyncio.create_task(self._refresh_in_background())
        return self._state

    async def _refresh(self) -> None:
        async with self._sessions() as s:
            state = await registry.serving(s)
        if self._backend is not None:
            await self._sync()  # before routing to a new adapter
        self._state = (state.active.name if state.active else None,
                       state.canary.name if state.canary else None)
        self._loaded_at = self._clock()

    async def _refresh_in_background(self) -> None:
        try:
            async with self._lock:
                await self._refresh()
        except Exception as exc:  # the routes stay as they are; tried again after refresh_s
            log.warning("adapter routes not refreshed: %s", exc)
            self._loaded_at = self._clock()
        finally:
            self._background = None

    async def _sync(self) -> None:
        """Load what the registry serves (after a restart of vLLM too); a failure only logs."""
        assert self._backend is not None
        try:
            await sync_adapters(self._sessions, self._backend, drain_grace=self._drain_grace)
        except InferenceError as exc:
            log.warning("adapter sync failed: %s", exc)


@dataclass
class DrainingBackend:
    """Wraps a backend and counts in-flight streams per adapter, so unloads can wait for them."""

    inner: InferenceBackend
    inflight: Counter[str | None] = field(default_factory=Counter)

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        self.inflight[request.adapter] += 1
        try:  # aclosing: closing this stream closes the inner one now, not at collection
            async with contextlib.aclosing(self.inner.stream(request)) as inner:
                async for event in inner:
                    yield event
        finally:
            self.inflight[request.adapter] -= 1

    async def drained(self, name: str, *, within: float) -> bool:
        """True once no request uses `name` (waits up to `within` seconds)."""
        deadline = time.monotonic() + within
        while self.inflight[name] > 0:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def health(self) -> None:
        await self.inner.health()

    async def load_adapter(self, name: str, path: str) -> None:
        await self.inner.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> None:
        await self.inner.unload_adapter(name)

    async def list_adapters(self) -> list[str]:
        return await self.inner.list_adapters()

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class SyncReport:
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # out of service, still draining


async def sync_adapters(sessions: async_sessionmaker[AsyncSession], backend: InferenceBackend,
                        *, drain_grace: timedelta = timedelta(seconds=60),
                        drain_timeout: float = 0.0) -> SyncReport:
    """Load active/canary adapters the backend lacks; unload drained retired/rejected ones.

    `drain_grace` covers requests in other processes (gateway replicas sharing one
    vLLM); a DrainingBackend also waits for this process's own in-flight requests.
    """
    report = SyncReport()
    async with sessions() as s:
        versions = await registry.all_versions(s)
    loaded = set(await backend.list_adapters())
    now = utcnow()
    for v in versions:
        if v.status in (AdapterStatus.ACTIVE, AdapterStatus.CANARY) and v.name not in loaded:
            try:
                await backend.load_adapter(v.name, v.path)
            except (AdapterRejected, AdapterNotFound) as exc:
                log.error("cannot load %s adapter %s: %s", v.status, v.name, exc)
                continue
            report.loaded.append(v.name)
        elif v.status in (AdapterStatus.RETIRED, AdapterStatus.REJECTED) and v.name in loaded:
            changed = v.updated_at
            if changed.tzinfo is None:
                changed = changed.replace(tzinfo=now.tzinfo)
            idle = (await backend.drained(v.name, within=drain_timeout)
                    if isinstance(backend, DrainingBackend) else True)
            if now - changed < drain_grace or not idle:
                report.waiting.append(v.name)
                continue
            try:
                await backend.unload_adapter(v.name)
            except InferenceError as exc:
                log.warning("unloading %s failed: %s", v.name, exc)
                continue
            report.unloaded.append(v.name)
    if report.loaded or report.unloaded:
        log.info("adapters synced: loaded %s, unloaded %s", report.loaded, report.unloaded)
    return report
