"""Long polling that confirms an update to Telegram only after it has been recorded.

aiogram's `start_polling` moves the offset past an update as soon as it is dispatched, so a
crash loses it (RELIABILITY.md §1). Here the offset only moves past a contiguous prefix of
updates whose turn (or vote, or correction) is stored. Later updates may already be running;
Telegram redelivers the unconfirmed ones, and those we already hold are not run twice.
An update that could not be recorded because the database was away stays unconfirmed for as
long as that lasts (polled again with a growing pause); only one failing for other reasons
three times is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiogram import Bot
from aiogram.exceptions import AiogramError, TelegramUnauthorizedError
from aiogram.types import Update

from bots.core import unavailable
from bots.telegram.convert import UPDATE_TYPES

log = logging.getLogger(__name__)


class Confirmations:
    """Updates taken from getUpdates and not yet confirmed, in update_id order."""

    def __init__(self, *, max_failures: int = 3) -> None:
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._failures: dict[int, int] = {}
        self._max_failures = max_failures
        self.offset: int | None = None
        self.stalled = False  # the first unconfirmed update failed: wait before polling again

    def __contains__(self, update_id: int) -> bool:
        return update_id in self._pending

    def add(self, update_id: int, recorded: asyncio.Future[None]) -> None:
        self._pending[update_id] = recorded

    def unrecorded(self) -> list[asyncio.Future[None]]:
        return [f for f in self._pending.values() if not f.done()]

    def _forget_failed(self) -> None:
        """Later updates that failed to record too are submitted again by the next poll."""
        for update_id, recorded in list(self._pending.items()):
            if recorded.done() and recorded.exception() is not None:
                del self._pending[update_id]

    def advance(self) -> int | None:
        """Move the offset past every leading recorded update; return the new offset."""
        self.stalled = False
        for update_id in sorted(self._pending):
            recorded = self._pending[update_id]
            if not recorded.done():
                break
            error = recorded.exception()
            del self._pending[update_id]
            if error is not None and unavailable(error):  # not the update's fault: keep it
                log.warning("update %s not recorded (database unavailable), will retry: %s",
                            update_id, error)
                self.stalled = True
                self._forget_failed()
                break
            if error is not None:
                self.stalled = True
                tries = self._failures[update_id] = self._failures.get(update_id, 0) + 1
                if tries < self._max_failures:  # leave it unconfirmed: the next poll retries it
                    log.warning("update %s failed (%s), will retry: %s", update_id, tries, error)
                    break
                log.error("update %s failed %s times, dropping it: %s", update_id, tries, error)
            self._failures.pop(update_id, None)
            self.offset = update_id + 1
        return self.offset


async def poll_forever(bot: Bot, submit: Callable[[Update], asyncio.Future[None]], *,
                       timeout_s: int, settle_s: float) -> None:
    """getUpdates in a loop; `submit` starts an update and resolves once it is recorded."""
    seen = Confirmations()
    backoff = 1.0
    stall = settle_s  # pause before polling again while recording fails
    while True:
        waiting = bool(seen.unrecorded())
        try:
            updates = await bot.get_updates(
                offset=seen.offset, timeout=0 if waiting else timeout_s,
                allowed_updates=UPDATE_TYPES, request_timeout=timeout_s + 15)
            backoff = 1.0
        except TelegramUnauthorizedError:
            log.error("telegram rejected the bot token: polling stopped")
            return
        except AiogramError as exc:  # network, 5xx, 409 conflict, undecodable answer
            log.warning("getUpdates failed: %s; retrying in %.1fs", exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 1.5, 10.0)
            continue
        for update in updates:
            if update.update_id not in seen:
                seen.add(update.update_id, submit(update))
        if unrecorded := seen.unrecorded():
            await asyncio.wait(unrecorded, timeout=settle_s)
        seen.advance()
        if seen.stalled:
            await asyncio.sleep(stall)
            stall = min(max(stall * 2, 0.1), 5.0)
        else:
            stall = settle_s
