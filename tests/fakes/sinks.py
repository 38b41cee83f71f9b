"""A ReplySink that records what the core sent, for tests of the channel-independent core."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RecordingSink:
    began: int = 0
    updates: list[str] = field(default_factory=list)
    final: str | None = None
    answer_id: int | None = None
    failed: str | None = None
    notices: list[str] = field(default_factory=list)

    async def begin(self) -> None:
        self.began += 1

    async def update(self, text: str) -> None:
        self.updates.append(text)

    async def finish(self, text: str, answer_id: int) -> str | None:
        self.final, self.answer_id = text, answer_id
        return f"ext-{answer_id}"

    async def fail(self, text: str) -> None:
        self.failed = text

    async def notice(self, text: str) -> None:
        self.notices.append(text)
