"""What the console asks of the learning loop, as plain data and callables (the gateway imports
no training code: chatloop.console builds these from feedback/)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession

if TYPE_CHECKING:
    from storage.memory import EntryStats


@dataclass(frozen=True, slots=True)
class CanaryView:
    """The canary against the active adapter (or the base model), as the scheduler's
    non-inferiority test sees it now."""

    canary: str
    control: str | None  # None: the base model
    canary_n: int
    canary_down: int
    control_n: int
    control_down: int
    decision: str  # promote / rollback / wait: what the next check would do
    diff: float  # canary 👎 rate - control 👎 rate (Agresti-Caffo adjusted)
    lower: float  # the one-sided confidence bounds of the difference
    upper: float
    margin: float
    min_votes: int
    max_votes: int
    tainted: bool = False


@dataclass(frozen=True)
class Operations:
    """What the console asks of the learning loop (built by chatloop.console)."""

    # approve (True) or reject a pending correction as `actor`; LookupError if not pending
    decide: Callable[[AsyncSession, int, bool, str], Awaitable[None]]
    # the canary's state now (None: no canary)
    canary: Callable[[], Awaitable[CanaryView | None]]
    # forget a person (identity) as `actor`; returns a one-line summary
    forget: Callable[[str, str], Awaitable[str]]
    # a memory entry's answer as the gateway serves it; None where it is not served at all
    # (it repeats the asker's details: feedback.redaction.served)
    served: Callable[[EntryStats], str | None]
