"""Which updates the poller may confirm: only a prefix of recorded ones (pure, no network)."""

from __future__ import annotations

import asyncio

from bots.telegram.polling import Confirmations


async def test_the_offset_moves_only_past_a_recorded_prefix() -> None:
    loop = asyncio.get_running_loop()
    seen = Confirmations()
    futures = {uid: loop.create_future() for uid in (10, 11, 12)}
    for uid, fut in futures.items():
        seen.add(uid, fut)
    assert seen.advance() is None
    futures[11].set_result(None)
    assert seen.advance() is None  # 10 is not recorded yet: 11 must wait
    futures[10].set_result(None)
    assert seen.advance() == 12 and 12 in seen and 10 not in seen
    futures[12].set_result(None)
    assert seen.advance() == 13


async def test_a_failed_update_is_retried_then_dropped() -> None:
    loop = asyncio.get_running_loop()
    seen = Confirmations(max_failures=2)
    first = loop.create_future()
    first.set_exception(RuntimeError("database down"))
    seen.add(5, first)
    assert seen.advance() is None and 5 not in seen  # unconfirmed: the next poll brings it
    again = loop.create_future()
    again.set_exception(RuntimeError("still down"))
    seen.add(5, again)
    assert seen.advance() == 6  # given up: confirmed so it cannot block the bot forever
