"""Event leases: the turns this process works on are held, renewed while they run, and given
up at shutdown, so another replica resumes a crashed process's turns but never a live one.

Lease times are the database's clock (PostgreSQL `now()`), never a host's. A process that
stalls past its lease (paused, swapped out, partitioned) finds at its next renewal that another
replica took the event over: renewal names the events still held by this owner, and the turn of
one that is not is stopped. Storing and delivering an answer confirm the lease first (which
renews it), so a stalled turn that wakes up neither stores nor sends a second answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage import events
from storage.sql import Executor

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """This process no longer holds the event: another replica answers it."""


class Leases:
    """The events one process (`owner`) holds; a heartbeat renews them three times a lease."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, owner: str,
                 lease_s: float) -> None:
        self._sessions = sessions
        self.owner = owner
        self.lease_s = lease_s
        self._held: set[int] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._turns: dict[int, asyncio.Task[object]] = {}  # the task running each held turn
        self._lost: set[int] = set()

    async def claim(self, event_id: int) -> bool:
        """Take an open event no live process holds (`storage.events.claim_event`)."""
        async with self._sessions() as s:
            return await events.claim_event(s, event_id=event_id, owner=self.owner,
                                            lease_s=self.lease_s)

    async def confirm(self, event_id: int, within: Executor | None = None) -> None:
        """Renew the lease on `event_id` now, or raise LeaseLost if another process has it;
        `within`: in that connection's transaction (a write it makes then stands or falls
        with the lease: the event's row stays locked until it commits)."""
        async with (contextlib.nullcontext(within) if within is not None
                    else self._sessions()) as s:
            renewed = await events.renew_leases(s, event_ids={event_id}, owner=self.owner,
                                                lease_s=self.lease_s, commit=within is None)
        if event_id not in renewed:
            self._lose(event_id, stop=False)
            raise LeaseLost(event_id)

    def _lose(self, event_id: int, *, stop: bool = True) -> None:
        log.warning("lost the lease on event %s (this process stalled past it): another "
                    "process answers it; stopping this turn", event_id)
        self._held.discard(event_id)
        task = self._turns.get(event_id)
        if stop and task is not None and not task.done():
            self._lost.add(event_id)
            task.cancel()

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
        task = asyncio.current_task()
        if task is not None:
            self._turns[event_id] = task
        try:
            yield
        except asyncio.CancelledError:
            if event_id not in self._lost or task is None:
                raise
            task.uncancel()  # stopped because the lease was lost: the turn ends here
            self.release(event_id)
        except LeaseLost:
            self.release(event_id)
        except BaseException:
            self.release(event_id)
            raise
        else:
            self.release(event_id)
        finally:
            self._lost.discard(event_id)
            if self._turns.get(event_id) is task:
                del self._turns[event_id]

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
                                              lease_s=None)
            except Exception as exc:  # they are taken over when the leases run out instead
                log.warning("could not give up %s event leases: %s", len(self._held), exc)
            self._held.clear()

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            held = set(self._held)
            try:
                async with self._sessions() as s:
                    renewed = await events.renew_leases(s, event_ids=held, owner=self.owner,
                                                        lease_s=self.lease_s)
            except Exception as exc:  # the next beat tries again
                log.warning("renewing event leases failed: %s", exc)
                continue
            for event_id in held - renewed:
                if event_id in self._held:  # not released meanwhile: taken over
                    self._lose(event_id)
