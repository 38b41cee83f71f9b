"""How fast answers are shown: per-message edit interval and a workspace-wide edit budget."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from bots.slack.render import MESSAGE_CHARS


class Pacer:
    """A workspace-wide token bucket for progress edits (chat.update is ~50/min per workspace)."""

    def __init__(self, *, per_minute: int) -> None:
        self._rate = per_minute / 60.0
        self._burst = max(1.0, per_minute / 5)
        self._tokens, self._last = self._burst, time.monotonic()

    async def take(self, stop: asyncio.Event) -> bool:
        """Wait for a token; False if `stop` is set first (the answer is complete)."""
        while True:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            try:
                await asyncio.wait_for(stop.wait(), (1.0 - self._tokens) / self._rate)
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
