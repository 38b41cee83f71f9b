"""Ordered lanes: jobs with the same key run one at a time in order, different keys at once."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable

log = logging.getLogger(__name__)
Job = Callable[[], Awaitable[None]]


class Lanes:
    """Per-conversation ordering without a task per idle conversation."""

    def __init__(self) -> None:
        self._queues: dict[Hashable, deque[Job]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, key: Hashable, job: Job) -> None:
        queue = self._queues.get(key)
        if queue is not None:
            queue.append(job)
            return
        self._queues[key] = deque([job])
        task = asyncio.create_task(self._drain(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, key: Hashable) -> None:
        queue = self._queues[key]
        try:
            while queue:
                try:
                    await queue[0]()
                except Exception:  # one bad job must not stall its lane
                    log.exception("telegram job in lane %s failed", key)
                queue.popleft()
        finally:
            del self._queues[key]

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def join(self, grace_s: float) -> bool:
        """Wait until every lane is empty; False if `grace_s` passed first."""
        deadline = asyncio.get_running_loop().time() + grace_s
        while self._tasks:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            await asyncio.wait(set(self._tasks), timeout=left)
        return True

    async def cancel(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
