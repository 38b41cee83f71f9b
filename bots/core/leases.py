"""Event leases: the turns this process works on are held, renewed while they run, and given
up at shutdown, so another replica resumes a crashed process's turns but never a live one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage import events
from storage.models import utcnow

log = logging.getLogger(__name__)


class Leases:
    """The events one process (`owner`) holds; a heartbeat renews them three times a lease."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, owner: str,
                 lease_s: float) -> None:
        self._sessions = sessions
        self.owner = owner
        self.lease_s = lease_s
        self._held: set[int] = set()
        self._heartbeat: asyncio.Task[None] | None = None

    def until(self) -> datetime:
        """When a lease taken or renewed now runs out."""
        return utcnow() + timedelta(seconds=self.lease_s)

    async def claim(self, event_id: int) -> bool:
        """Take an open event no live process holds (`storage.events.claim_event`)."""
        async with self._sessions() as s:
            return await events.claim_event(s, event_id=event_id, owner=self.owner,
                                            lease_until=self.until())

    def hold(self, event_id: int) -> None:
        self._held.add(event_id)
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._renew())

    def release(self, event_id: int) -> None:
        self._held.discard(event_id)
        if not self._held and self._heartbeat is not None:  # nothing left to renew
            self._heartbeat.cancel()
            self._heartbeat = None

    @contextlib.asynccontextmanager
    async def holding(self, event_id: int) -> AsyncIterator[None]:
        """The turn of a held event: once it ends, its lease is no longer renewed (an error
        leaves the event to be resumed when the lease runs out). A turn cancelled by a
        shutdown stays held, and `aclose` gives its lease up for the next start."""
        try:
            yield
        except asyncio.CancelledError:
            raise
        except BaseException:
            self.release(event_id)
            raise
        self.release(event_id)

    async def aclose(self) -> None:
        """Stop renewing and give up the leases still held (turns cut short by a shutdown),
        so the next start resumes them at once instead of after the lease."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        if self._held:
            try:
                async with self._sessions() as s:
                    await events.renew_leases(s, event_ids=self._held, owner=self.owner,
                                              lease_until=None)
            except Exception as exc:  # they are taken over when the leases run out instead
                log.warning("could not give up %s event leases: %s", len(self._held), exc)
            self._held.clear()

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                async with self._sessions() as s:
                    await events.renew_leases(s, event_ids=set(self._held), owner=self.owner,
                                              lease_until=self.until())
            except Exception as exc:  # the next beat tries again
                log.warning("renewing event leases failed: %s", exc)
