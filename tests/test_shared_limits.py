"""Rate limits and send budgets shared by gateway replicas through Redis (CHATLOOP_REDIS_URL).

Each replica gets its own Redis client (as separate processes would); the buckets live in
Redis at 127.0.0.1:6379 under keys unique to the test run. Skipped when Redis is not there.
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiogram.types import Update

import bots.limits as limits
from bots.limits import LocalBuckets, RateLimiter, RedisBuckets
from bots.slack.pacing import Pacer as SlackPacer
from bots.telegram import TelegramChannel, TelegramOptions, make_bot
from bots.telegram.outbound import RetryPolicy
from bots.telegram.sink import Pacer as TelegramPacer
from storage.db import make_engine, session_factory
from tests.conftest import database_at
from tests.fakes.inference import ScriptedBackend
from tests.fakes.servers import serve_app
from tests.fakes.telegram_api import FakeTelegram
from tests.telegram.conftest import eventually, make_core
from tests.telegram.conftest import tokenizer as tokenizer  # noqa: F401  (the fixture)

REDIS = "redis://127.0.0.1:6379/0"


def _redis_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _redis_up(), reason="no Redis at 127.0.0.1:6379")


@pytest.fixture
async def replicas_buckets() -> AsyncIterator[list[RedisBuckets]]:
    """Three Redis clients, one per replica, under a prefix unique to this test."""
    prefix = f"chatloop-test:{random.getrandbits(48):x}:"
    clients = [RedisBuckets(REDIS, prefix=prefix) for _ in range(3)]
    yield clients
    for c in clients:
        await c.aclose()


async def _granted_per_replica(pacers: list[Any], seconds: float) -> int:
    granted = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for p in pacers:
            if await p.slot(7, 1.0) == 0.0:
                granted += 1
        await asyncio.sleep(0.01)
    return granted


async def test_telegram_chat_pace_is_shared_by_replicas(replicas_buckets) -> None:  # type: ignore[no-untyped-def]
    bot = str(random.getrandbits(32))
    shared = [TelegramPacer(buckets=b, bot=bot) for b in replicas_buckets]
    alone = [TelegramPacer(buckets=LocalBuckets(), bot=bot) for _ in range(3)]
    in_redis = await _granted_per_replica(shared, 2.0)
    per_process = await _granted_per_replica(alone, 2.0)
    print(f"\n3 replicas, 1 edit/s per chat, 2 s: shared in Redis {in_redis} streaming calls, "
          f"per process {per_process}")
    assert in_redis <= 3  # the burst of one plus one a second
    assert per_process >= 5  # what three unshared replicas send (6 in 2 s)


async def test_rate_limit_and_slack_edit_budget_are_shared(replicas_buckets) -> None:  # type: ignore[no-untyped-def]
    user = f"telegram:{random.getrandbits(40)}"
    limiters = [RateLimiter(per_minute=5, buckets=b) for b in replicas_buckets]
    allowed = [await limiters[i % 3].allow(user) for i in range(12)]
    await limiters[0].refund(user)
    again = await limiters[1].allow(user)
    print(f"\nrate limit 5/min, 12 messages over 3 replicas: {sum(allowed)} allowed; "
          f"after a refund: {again}")
    assert sum(allowed) == 5 and again

    workspace = f"T{random.getrandbits(32):x}"
    pacers = [SlackPacer(per_minute=60, buckets=b, workspace=workspace)
              for b in replicas_buckets]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_later(1.5, stop.set)
    takes = await asyncio.gather(*(_count_takes(p, stop) for p in pacers))
    print(f"slack workspace edits, 60/min (burst 12), 3 replicas, 1.5 s: {takes}")
    assert sum(takes) <= 12 + 2


async def _count_takes(pacer: SlackPacer, stop: asyncio.Event) -> int:
    n = 0
    while await pacer.take(stop):
        n += 1
    return n


def _per_second(times: list[float]) -> int:
    """The most calls in any one-second sliding window."""
    times, best, j = sorted(times), 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


@pytest.fixture
async def sqlite_sessions(tmp_path):  # type: ignore[no-untyped-def]
    """The budgets do not depend on the database: SQLite alone."""
    async with database_at("sqlite", "head", tmp_path) as url:
        engine = make_engine(url)
        yield session_factory(engine)
        await engine.dispose()


async def test_three_telegram_replicas_stay_within_the_platform_limits(  # type: ignore[no-untyped-def]
        sqlite_sessions, tokenizer, monkeypatch) -> None:
    sessions = sqlite_sessions
    bot_id = random.getrandbits(40)
    token = f"{bot_id}:TEST-shared-limits"
    fake = FakeTelegram(token=token)
    monkeypatch.setenv("CHATLOOP_REDIS_URL", REDIS)
    monkeypatch.setattr(limits, "_shared", {})  # a client per replica, like three processes
    async with serve_app(fake.app()) as url:
        channels: list[TelegramChannel] = []
        clients: list[RedisBuckets] = []
        backend = ScriptedBackend(answer=lambda _r: "word " * 60, chunk=5, delay=0.03)
        for _ in range(3):
            clients.extend(limits._shared.values())
            limits._shared.clear()
            core = make_core(sessions, tokenizer, backend, rate_limit_per_minute=1000)
            channel = TelegramChannel(
                core=core, bot=make_bot(token, api_base=url),
                options=TelegramOptions(mode="webhook", webhook_url="https://example.invalid/hook",
                                        webhook_secret="s3cret", draft_interval_s=0.05,
                                        edit_interval_s=1.0, preview_after_s=0.0, drain_s=5.0),
                retry=RetryPolicy(backoff_s=0.05, max_backoff_s=0.2))
            await channel.start()
            channels.append(channel)
        fake.webhook = None  # updates are handed to the replicas below, round robin
        base = random.randint(10**6, 10**9)
        group = fake.group(-(10**12) - base % 10**6)
        updates = [fake.mention(group, f"question {i}", user=fake.user(base + i))
                   for i in range(6)]
        for i in range(60):
            chat = fake.private(base + 100 + i)
            updates.append(fake.say(chat, f"hello {i}"))
        try:
            for i, u in enumerate(updates):
                channels[i % 3].submit(Update.model_validate(u, context={"bot": channels[0].bot}))
            await eventually(lambda: sum(1 for c in fake.calls if c.method == "sendMessage"
                                         and c.params.get("reply_markup")) >= 60
                             and len(fake.answers(group["id"])) >= 6, within=120)
        finally:
            for channel in channels:
                await channel.stop()
            for client in [*clients, *limits._shared.values()]:
                await client.aclose()
    sends = [c for c in fake.calls if c.method in
             ("sendMessage", "editMessageText", "sendMessageDraft")]
    bot_peak = _per_second([c.at for c in sends])
    previews: dict[int, list[float]] = collections.defaultdict(list)
    for c in sends:
        if not c.params.get("reply_markup") and c.method != "sendMessageDraft":
            previews[int(c.params["chat_id"])].append(c.at)
    times = sorted(previews[group["id"]])
    group_peak = _per_second(times)
    span = times[-1] - times[0] if times else 0.0
    print(f"\n3 replicas, {len(updates)} questions, {len(sends)} messages/edits/drafts: "
          f"peak {bot_peak}/s for the bot (limit 30); group previews {len(times)} in {span:.1f} s, "
          f"peak {group_peak}/s (1 edit/s per chat)")
    assert bot_peak <= 30
    assert len(times) <= span + 2  # one a second, plus the first (arrival jitter aside)
    assert group_peak <= 3
