"""The serving side's adapter registry: names, paths, status, load/unload, routing.

Modelled on vLLM's `OpenAIServingModels`: a name maps to a record (path, rank,
status); loads and unloads of one name are serialised by that name's lock, and a
load is validate -> load into the backend -> record. On top of that it serves what
the learning loop decided, read through an injected `source` (the composition root
builds it from storage; this module imports no storage):

- `sync` makes the backend serve the source's state: the active and canary adapters
  are (re)loaded (after a restart of the gateway or of vLLM too); retired ones are
  unloaded only after their drain grace and once this process's in-flight streams on
  them have ended (`backend`, a `DrainingBackend`, counts them).
- `route` is the conversation core's router: a stable hash of the conversation id
  puts `canary_percent` of conversations on the canary, the rest on the active
  adapter (or the base model). Only the first request waits for the source; later
  refreshes (every `refresh_s`) run in the background while requests keep the routes
  they have, and a route points to an adapter only once the backend has loaded it: a
  canary not (yet) loaded, or refused, leaves its slice on the active adapter, an active
  one the base model.
- `health` is the readiness check: a backend that was away may be back without its adapters
  (a restarted vLLM), so the first check that passes after a failed one re-syncs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

from inference.adapters import inside, validate_adapter
from inference.base import GenerationRequest, InferenceBackend, StreamEvent
from inference.errors import AdapterNotFound, AdapterRejected, InferenceError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """An adapter to serve: its (never reused) name, its peft directory, its recorded rank."""

    name: str
    path: str
    rank: int | None = None


@dataclass(frozen=True, slots=True)
class Retired:
    """An adapter out of service since `since` (timezone-aware): unloaded once drained."""

    name: str
    since: datetime


@dataclass(frozen=True, slots=True)
class ServingState:
    """What should be served: the learning loop's decision, as the source reports it."""

    active: AdapterRef | None = None
    canary: AdapterRef | None = None
    retired: tuple[Retired, ...] = ()


StateSource = Callable[[], Awaitable[ServingState]]


class AdapterState(StrEnum):
    LOADED = "loaded"
    DRAINING = "draining"  # out of service, loaded until its requests have ended
    REFUSED = "refused"  # validation or the backend refused to load it; retried at each sync


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    name: str
    path: str | None  # None: found loaded on the backend (loaded by another process)
    rank: int | None
    status: AdapterState
    error: str | None = None


@dataclass
class SyncReport:
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # out of service, still draining
    refused: list[str] = field(default_factory=list)  # to serve, but could not be loaded


def in_canary(conversation_id: int, canary: str, percent: float) -> bool:
    """Sticky: the same conversation always lands on the same side for one canary."""
    digest = hashlib.sha256(f"{canary}:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < percent * 100


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


class AdapterRegistry:
    """The adapters one backend serves, and the routes to them (see the module docstring).

    `backend` is what requests must stream through (it counts them for the drain).
    `max_rank`, if given, refuses adapter directories whose LoRA rank is above it before
    the backend is asked; `adapters_dir`, paths outside that directory. `aclose` stops the
    background refresh; the backend is the caller's to close.
    """

    def __init__(self, backend: InferenceBackend, *, source: StateSource,
                 canary_percent: float = 0.0, refresh_s: float = 5.0,
                 drain_grace: timedelta = timedelta(seconds=60), max_rank: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 adapters_dir: str | Path | None = None) -> None:
        self.backend = backend if isinstance(backend, DrainingBackend) else DrainingBackend(backend)
        self._source = source
        self._percent = canary_percent
        self._refresh_s = refresh_s
        self._drain_grace = drain_grace
        self._max_rank = max_rank
        self._adapters_dir = adapters_dir  # if set, every loaded path must lie inside it
        self._clock = clock
        self._records: dict[str, AdapterRecord] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # one per name
        self._sync_lock = asyncio.Lock()
        self._routes: tuple[str | None, str | None] = (None, None)  # (active, canary)
        self._loaded_at: float | None = None
        self._refresh_lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        self._resync = False  # the backend was away: it may be back without its adapters

    # -- names, records, load/unload (vLLM's OpenAIServingModels) --

    def get(self, name: str) -> AdapterRecord | None:
        return self._records.get(name)

    def adapters(self) -> list[AdapterRecord]:
        """Every adapter the registry knows of: loaded, draining, or refused."""
        return list(self._records.values())

    async def load(self, name: str, path: str, *, rank: int | None = None) -> AdapterRecord:
        """Validate, load into the backend, record. Loading a loaded name again is a no-op.

        Raises AdapterRejected (bad files, a rank above `max_rank`, the name taken by other
        weights) or AdapterNotFound (the backend refused it), recorded as REFUSED; other
        InferenceErrors (the backend is away) leave the record as it was.
        """
        async with self._locks[name]:
            known = self._records.get(name)
            if known is not None and known.status != AdapterState.REFUSED:
                if known.path is not None and known.path != path:
                    raise AdapterRejected(f"adapter name {name!r} is taken by {known.path}: "
                                          "use a new versioned name")
                if known.status == AdapterState.DRAINING:  # back in service
                    known = self._marked(name, AdapterState.LOADED, path=path, rank=rank)
                    self._records[name] = known
                return known
            try:
                if self._adapters_dir is not None:  # paths come from the database
                    inside(path, self._adapters_dir)
                if self._max_rank is not None:
                    rank = validate_adapter(path, max_rank=self._max_rank)
                await self.backend.load_adapter(name, path)
            except (AdapterRejected, AdapterNotFound) as exc:
                self._records[name] = AdapterRecord(name, path, rank, AdapterState.REFUSED,
                                                    error=str(exc))
                raise
            record = AdapterRecord(name, path, rank, AdapterState.LOADED)
            self._records[name] = record
            return record

    async def unload(self, name: str, *, wait: float = 0.0) -> bool:
        """Unload `name` once this process's requests on it have ended (waiting up to `wait`
        seconds for them); False, and it stays loaded (DRAINING), if they have not."""
        async with self._locks[name]:
            if not await self.backend.drained(name, within=wait):
                self._records[name] = self._marked(name, AdapterState.DRAINING)
                return False
            await self.backend.unload_adapter(name)
            self._records.pop(name, None)
            return True

    # -- serving what the source says --

    async def sync(self, state: ServingState | None = None, *,
                   drain_timeout: float = 0.0) -> SyncReport:
        """Load the active/canary adapters the backend lacks; unload drained retired ones.

        `drain_grace` (from the constructor) covers requests in other processes (gateway
        replicas sharing one vLLM); this process's own requests are waited for up to
        `drain_timeout` seconds. A refused load or a failed unload is logged and skipped;
        an unreachable backend raises its InferenceError.
        """
        state = state if state is not None else await self._source()
        async with self._sync_lock:
            report = SyncReport()
            loaded = set(await self.backend.list_adapters())
            self._reconcile(loaded)
            for ref in (state.active, state.canary):
                if ref is None:
                    continue
                if ref.name in loaded:  # in service again if it was draining (a rollback)
                    self._records[ref.name] = self._marked(ref.name, AdapterState.LOADED,
                                                           path=ref.path, rank=ref.rank)
                    continue
                try:
                    await self.load(ref.name, ref.path, rank=ref.rank)
                except (AdapterRejected, AdapterNotFound) as exc:
                    log.error("cannot load adapter %s: %s", ref.name, exc)
                    report.refused.append(ref.name)
                    continue
                report.loaded.append(ref.name)
            now = datetime.now(UTC)
            for gone in state.retired:
                if gone.name not in loaded:
                    self._records.pop(gone.name, None)
                    continue
                if now - gone.since < self._drain_grace:
                    self._records[gone.name] = self._marked(gone.name, AdapterState.DRAINING)
                    report.waiting.append(gone.name)
                    continue
                try:
                    done = await self.unload(gone.name, wait=drain_timeout)
                except InferenceError as exc:
                    log.warning("unloading %s failed: %s", gone.name, exc)
                    continue
                (report.unloaded if done else report.waiting).append(gone.name)
        if report.loaded or report.unloaded:
            log.info("adapters synced: loaded %s, unloaded %s", report.loaded, report.unloaded)
        return report

    def _reconcile(self, listed: set[str]) -> None:
        """Records follow the backend: what it lost (a restart) is forgotten, what another
        process loaded (the trainer's parity check) is known."""
        for name, record in list(self._records.items()):
            if record.status != AdapterState.REFUSED and name not in listed:
                del self._records[name]
        for name in listed:
            record = self._records.get(name)
            if record is None or record.status == AdapterState.REFUSED:
                self._records[name] = self._marked(name, AdapterState.LOADED)

    def _marked(self, name: str, status: AdapterState, *, path: str | None = None,
                rank: int | None = None) -> AdapterRecord:
        """`name`'s record with this status (its path and rank as known)."""
        known = self._records.get(name)
        return AdapterRecord(name, (known.path if known else None) or path,
                             (known.rank if known else None) or rank, status)

    # -- routing (the conversation core's Router) --

    async def route(self, conversation_id: int) -> str | None:
        active, canary = await self._current()
        if canary is not None and in_canary(conversation_id, canary, self._percent):
            return canary
        return active

    def invalidate(self) -> None:
        """The next request waits for a fresh read of the source."""
        self._loaded_at = None

    async def refresh(self) -> None:
        """Read the source, sync the backend (a failure only logs), then set the routes."""
        state = await self._source()
        try:
            await self.sync(state)  # before routing to a new adapter
            self._resync = False
        except InferenceError as exc:
            log.warning("adapter sync failed: %s", exc)
        self._routes = (self._servable(state.active), self._servable(state.canary))
        self._loaded_at = self._clock()

    async def health(self) -> None:
        """The backend's health (readiness). After a failed check the backend may come back
        without its adapters (a restarted vLLM): the first check that passes re-syncs them
        before it reports healthy, and the next request waits for a fresh read."""
        try:
            await self.backend.health()
        except InferenceError:
            self._resync = True
            self.invalidate()
            raise
        if self._resync:
            try:
                async with self._refresh_lock:
                    if self._resync:
                        await self.refresh()
            except Exception as exc:  # the source's database: readiness checks it on its own
                log.warning("adapters not re-synced: %s", exc)

    def _servable(self, ref: AdapterRef | None) -> str | None:
        if ref is None:
            return None
        record = self._records.get(ref.name)
        return ref.name if record is not None and record.status == AdapterState.LOADED else None

    async def aclose(self) -> None:
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background

    async def _current(self) -> tuple[str | None, str | None]:
        if self._loaded_at is None:
            async with self._refresh_lock:
                if self._loaded_at is None:
                    await self.refresh()
        elif (self._clock() - self._loaded_at >= self._refresh_s
              and self._background is None):
            self._background = asyncio.create_task(self._refresh_in_background())
        return self._routes

    async def _refresh_in_background(self) -> None:
        try:
            async with self._refresh_lock:
                await self.refresh()
        except Exception as exc:  # the routes stay as they are; tried again after refresh_s
            log.warning("adapter routes not refreshed: %s", exc)
            self._loaded_at = self._clock()
        finally:
            self._background = None
