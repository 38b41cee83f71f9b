"""The workspace-wide edit budget: progress edits stay within Slack's per-workspace limit."""

from __future__ import annotations

import asyncio
import time

from bots.slack.pacing import Pacer
from tests.slack.conftest import Launch, payload
from tests.slack.gateway_proc import scripted


async def test_pacer_allows_a_burst_then_waits_until_stopped() -> None:
    pacer, stop = Pacer(per_minute=60), asyncio.Event()
    started = time.monotonic()
    assert all([await pacer.take(stop) for _ in range(12)])  # burst: a fifth of a minute
    assert time.monotonic() - started < 0.1
    asyncio.get_running_loop().call_later(0.1, stop.set)
    assert await pacer.take(stop) is False  # no token for ~1 s; the answer finished first


async def test_concurrent_answers_share_the_workspace_budget(launch: Launch,
                                                             sqlite_url: str) -> None:
    words = " ".join(f"w{i}" for i in range(80))
    backend = scripted(answer=lambda r: words, chunk=4, delay=0.01)
    async with launch(sqlite_url, backend, slack_updates_per_minute=10,
                      slack_update_interval_s=0.0) as gw:
        bodies = []
        for n in range(6):
            body = payload("dm", ts=f"1735689700.00010{n}", user=f"U30{n}")
            body["event_id"] = f"EvBudget{n}"
            bodies.append(body)
        started = time.monotonic()
        await asyncio.gather(*(gw.event(b) for b in bodies))
        for b in bodies:
            [answer] = await gw.answered("D111", b["event"]["ts"])
            assert answer.text == words
        # six answers of ~80 deltas each: progress limited to the burst (2) and the refill
        # (10 a minute); every final is sent
        took = time.monotonic() - started
        assert gw.fake.count("chat.appendStream") <= 2 + took / 6 + 1
        assert gw.fake.count("chat.stopStream") == 6
