"""Per-user rate limits and platform send budgets (token buckets, in Redis when
`CHATLOOP_REDIS_URL` is set, else per process), and per-conversation locks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Protocol

log = logging.getLogger(__name__)


class Buckets(Protocol):
    """Token buckets by key. `take` spends one token and returns 0.0, or spends nothing and
    returns the seconds until a token is there; `give` puts one back."""

    async def take(self, key: str, rate: float, burst: float) -> float: ...

    async def give(self, key: str, rate: float, burst: float) -> None: ...


class LocalBuckets:
    """Token buckets in this process (one gateway replica)."""

    def __init__(self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic,
                 ) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._max_keys, self._clock = max_keys, clock

    def _spend(self, key: str, rate: float, burst: float, cost: float) -> float:
        now = self._clock()
        tokens, last = self._buckets.pop(key, (burst, now))
        tokens = min(burst, tokens + max(0.0, now - last) * rate)
        wait = 0.0
        if cost < 0 or tokens >= cost:
            tokens = min(burst, tokens - cost)
        else:
            wait = (cost - tokens) / rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:  # forget the least recently used key
            self._buckets.popitem(last=False)
        return wait

    async def take(self, key: str, rate: float, burst: float) -> float:
        return self._spend(key, rate, burst, 1.0)

    async def give(self, key: str, rate: float, burst: float) -> None:
        self._spend(key, rate, burst, -1.0)


# One round trip; the time is the Redis server's, so replicas on hosts whose clocks disagree
# share one bucket correctly. Floats go back as strings (Lua numbers become integers).
_BUCKET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(v[1]) or burst
local at = tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if cost < 0 or tokens >= cost then
  tokens = math.min(burst, tokens - cost)
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


class RedisBuckets:
    """Token buckets in Redis, shared by every replica: one Lua script per call.

    If Redis cannot be reached the limits fall back to this process's own buckets (logged
    once per outage) rather than refusing every message.
    """

    def __init__(self, url: str, *, prefix: str = "chatloop:bucket:") -> None:
        import redis.asyncio as aioredis  # only when configured

        self._redis = aioredis.from_url(url, socket_timeout=3.0, socket_connect_timeout=3.0)
        self._script = self._redis.register_script(_BUCKET_LUA)
        self._prefix = prefix
        self._local = LocalBuckets()
        self._down = False

    async def _spend(self, key: str, rate: float, burst: float, cost: float) -> float:
        try:
            wait = float(await self._script(keys=[self._prefix + key],
                                            args=[repr(rate), repr(burst), repr(cost)]))
        except Exception as exc:  # Redis away: per process until it returns
            if not self._down:
                log.warning("redis unreachable, limits are per process meanwhile: %s",
                            type(exc).__name__)
                self._down = True
            return self._local._spend(key, rate, burst, cost)
        self._down = False
        return wait

    async def take(self, key: str, rate: float, burst: float) -> float:
        return await self._spend(key, rate, burst, 1.0)

    async def give(self, key: str, rate: float, burst: float) -> None:
        await self._spend(key, rate, burst, -1.0)

    async def aclose(self) -> None:
        await self._redis.aclose()


_shared: dict[str, RedisBuckets] = {}


def shared_buckets() -> Buckets | None:
    """The Redis buckets every replica shares when `CHATLOOP_REDIS_URL` is set; None when it
    is not (each limiter then keeps its own buckets in this process)."""
    url = os.environ.get("CHATLOOP_REDIS_URL", "").strip()
    if not url:
        return None
    if url not in _shared:
        _shared[url] = RedisBuckets(url)
    return _shared[url]


async def wait_for_token(buckets: Buckets, key: str, rate: float, burst: float) -> None:
    """Wait until `key`'s bucket gives a token."""
    while True:
        wait = await buckets.take(key, rate, burst)
        if wait <= 0:
            return
        await asyncio.sleep(wait)


class RateLimiter:
    """Token bucket per user: `per_minute` requests, refilled continuously; shared by the
    replicas through `buckets` (default: `shared_buckets()`, else per process)."""

    def __init__(self, *, per_minute: int, buckets: Buckets | None = None) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(per_minute)
        self.buckets = buckets or shared_buckets() or LocalBuckets()

    async def allow(self, user: str) -> bool:
        return await self.buckets.take(f"rate:{user}", self._rate, self._burst) == 0.0

    async def refund(self, user: str) -> None:
        """Give back the token of a request that could not be recorded (the database was
        away): the platform delivers it again, and that must not count twice."""
        await self.buckets.give(f"rate:{user}", self._rate, self._burst)


class KeyedLocks:
    """One asyncio.Lock per key (per conversation), dropped when nobody holds or waits on it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
