"""How fast answers are shown: per-message edit interval and a workspace-wide edit budget."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from bots.limits import Buckets, LocalBuckets
from bots.slack.render import MESSAGE_CHARS


class Pacer:
    """A workspace-wide token bucket for progress edits (chat.update is ~50/min per workspace),
    in `buckets`: replicas share it through Redis (`bots.limits.shared_buckets`)."""

    def __init__(self, *, per_minute: int, buckets: Buckets | None = None,
                 workspace: str = "workspace") -> None:
        self._rate = per_minute / 60.0
        self._burst = max(1.0, per_minute / 5)
        self._buckets = buckets or LocalBuckets()
        self._key = f"slack:{workspace}:edits"

    async def take(self, stop: asyncio.Event) -> bool:
        """Wait for a token; False if `stop` is set first (the answer is complete)."""
        while True:
            wait = await self._buckets.take(self._key, self._rate, self._burst)
            if wait <= 0:
                return True
            try:
                await asyncio.wait_for(stop.wait(), wait)
                return False
            except TimeoutError:
                continue


@dataclass(frozen=True, slots=True)
class Pacing:
    """How one workspace's answers are shown; shared by every sink of the channel."""

    edits: Pacer
    interval_s: float = 1.0  # at least this long between two edits of one message
    streaming: bool = True
    message_chars: int = MESSAGE_CHARS
