"""One backend over several inference servers (vLLM replicas), each with every adapter.

A runtime-loaded LoRA adapter lives on the one vLLM server that loaded it, so adapters are
loaded on every endpoint, and an endpoint that comes back from an outage gets the adapters
loaded through this backend again before it serves. A conversation stays on one endpoint
while that endpoint is up (rendezvous hashing on the conversation id and the endpoint URLs,
the same choice in every gateway replica), so its prefix cache stays warm; an endpoint that
fails is marked down, its conversations move to their next choice, and it is checked again
every `recheck_s` seconds in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from inference.base import GenerationRequest, InferenceBackend, StreamEvent
from inference.errors import AdapterNotFound, BackendUnavailable, InferenceError

log = logging.getLogger(__name__)


class Endpoint(InferenceBackend, Protocol):
    base_url: str


def preference(conversation_id: int | None, urls: Sequence[str]) -> list[int]:
    """Endpoint indexes, the conversation's own first: rendezvous (highest random weight)
    hashing, so a conversation whose endpoint is down moves and the others stay put."""
    def weight(i: int) -> bytes:
        return hashlib.sha256(f"{conversation_id}|{urls[i]}".encode()).digest()

    return sorted(range(len(urls)), key=weight, reverse=True)


class ReplicaBackend:
    """The InferenceBackend protocol over several endpoints (see the module docstring)."""

    def __init__(self, endpoints: Sequence[Endpoint], *, recheck_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not endpoints:
            raise ValueError("ReplicaBackend needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.model_name = endpoints[0].model_name
        self.urls = [e.base_url for e in endpoints]
        self._recheck_s = recheck_s
        self._clock = clock
        self._down: set[int] = set()
        self._checked_at = clock()
        self._adapters: dict[str, str] = {}  # loaded through this backend: name -> path
        self._recheck: asyncio.Task[None] | None = None

    def down(self) -> list[str]:
        """The URLs of the endpoints marked down."""
        return [self.urls[i] for i in sorted(self._down)]

    def route(self, conversation_id: int | None) -> list[int]:
        """The endpoints to try for a conversation, in order: its own first, those up before
        those down (tried last, in case they are back)."""
        order = preference(conversation_id, self.urls)
        return [i for i in order if i not in self._down] + [i for i in order if i in self._down]

    def _up(self) -> list[int]:
        """The endpoints up; all of them when none is (they may be back)."""
        up = [i for i in range(len(self.endpoints)) if i not in self._down]
        return up or list(range(len(self.endpoints)))

    def _mark_down(self, i: int, exc: Exception) -> None:
        if i not in self._down:
            log.warning("inference endpoint %s is down: %s", self.urls[i], exc)
        self._down.add(i)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        self._recheck_due()
        failure: BackendUnavailable | None = None
        for i in self.route(request.conversation_id):
            started = False
            try:
                async with contextlib.aclosing(self.endpoints[i].stream(request)) as inner:
                    async for event in inner:
                        started = True
                        yield event
                return
            except BackendUnavailable as exc:
                self._mark_down(i, exc)
                if started:  # the user saw part of this answer: no second one elsewhere
                    raise
                failure = exc
        raise BackendUnavailable(f"no inference endpoint answered: {failure}") from failure

    async def health(self) -> None:
        """Check every endpoint (a returning one gets its adapters first); healthy while at
        least one is. The endpoints found down are logged by URL."""
        await asyncio.gather(*(self._check(i) for i in range(len(self.endpoints))))
        self._checked_at = self._clock()
        if len(self._down) == len(self.endpoints):
            raise BackendUnavailable(f"all {len(self.endpoints)} inference endpoints are down")
        if self._down:
            log.warning("inference endpoints down: %s", ", ".join(self.down()))

    async def _check(self, i: int) -> None:
        endpoint = self.endpoints[i]
        try:
            await endpoint.health()
            if i in self._down:  # back (perhaps restarted, with no adapters): load them first
                await self._load_missing(endpoint, dict(self._adapters))
                log.info("inference endpoint %s is back", self.urls[i])
        except InferenceError as exc:  # away, or it refuses an adapter the others serve
            self._mark_down(i, exc)
            return
        self._down.discard(i)

    def _recheck_due(self) -> None:
        """Check the endpoints marked down again, in the background, every `recheck_s`."""
        if (self._down and self._recheck is None
                and self._clock() - self._checked_at >= self._recheck_s):
            self._recheck = asyncio.create_task(self._recheck_down())

    async def _recheck_down(self) -> None:
        try:
            await asyncio.gather(*(self._check(i) for i in list(self._down)))
        finally:
            self._checked_at = self._clock()
            self._recheck = None

    async def _load_missing(self, endpoint: Endpoint, adapters: dict[str, str]) -> None:
        loaded = set(await endpoint.list_adapters())
        for name, path in adapters.items():
            if name not in loaded:
                await endpoint.load_adapter(name, path)

    async def load_adapter(self, name: str, path: str) -> None:
        """Load on every endpoint up that lacks it; those down get it when they return.
        A refusal (AdapterRejected) raises; so does having no endpoint up."""
        loaded_somewhere = False
        for i in self._up():
            try:
                await self._load_missing(self.endpoints[i], {name: path})
            except BackendUnavailable as exc:
                self._mark_down(i, exc)
                continue
            loaded_somewhere = True
        if not loaded_somewhere:
            raise BackendUnavailable(f"adapter {name!r}: no inference endpoint is up")
        self._adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        self._adapters.pop(name, None)
        found = False
        for i in self._up():
            try:
                await self.endpoints[i].unload_adapter(name)
                found = True
            except AdapterNotFound:
                continue
            except BackendUnavailable as exc:
                self._mark_down(i, exc)
        if not found:
            raise AdapterNotFound(f"adapter {name!r} is loaded on no endpoint up")

    async def list_adapters(self) -> list[str]:
        """The adapters every endpoint up has: one an endpoint lacks is missing, so that the
        registry's sync loads it (on the endpoints that lack it)."""
        listed: list[set[str]] = []
        for i in self._up():
            try:
                listed.append(set(await self.endpoints[i].list_adapters()))
            except BackendUnavailable as exc:
                self._mark_down(i, exc)
        if not listed:
            raise BackendUnavailable("no inference endpoint is up")
        return sorted(set.intersection(*listed))

    async def aclose(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recheck
        for endpoint in self.endpoints:
            await endpoint.aclose()
