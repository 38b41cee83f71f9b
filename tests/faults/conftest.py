"""The fault suite: an own PostgreSQL server to stop, a report of what each test injected and
counted, and the suite's totals of lost and doubled messages and votes (goal: zero)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from storage.db import make_engine, session_factory
from tests.faults.pgserver import OwnPostgres

# how long the database stays away in the outage tests (the 60 s behaves the same:
# nothing in the gateway counts time while the database is away; set it to check)
OUTAGE_S = float(os.environ.get("CHATLOOP_FAULT_OUTAGE_S", "12"))


@dataclass
class Tally:
    test: str
    injected: list[str] = field(default_factory=list)
    counted: dict[str, Any] = field(default_factory=dict)
    lost: int = 0
    doubled: int = 0

    def inject(self, what: str) -> None:
        self.injected.append(what)
        print(f"[fault] {self.test}: injected {what}")

    def count(self, **counts: Any) -> None:
        self.counted.update(counts)
        print(f"[fault] {self.test}: counted " + ", ".join(f"{k}={v}" for k, v in counts.items()))

    def messages(self, expected: dict[str, int], delivered: dict[str, int]) -> None:
        """Lost and doubled from per-item counts (expected once each)."""
        self.lost += sum(max(0, n - delivered.get(k, 0)) for k, n in expected.items())
        self.doubled += sum(max(0, delivered.get(k, 0) - expected.get(k, 0)) for k in delivered)
        self.count(lost=self.lost, doubled=self.doubled)


_TALLIES: list[Tally] = []


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Tally:
    t = Tally(request.node.name)
    _TALLIES.append(t)
    return t


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _TALLIES:
        return
    tr = terminalreporter
    tr.section("fault suite: lost and doubled (goal: zero)")
    for t in _TALLIES:
        tr.write_line(f"{t.test}: injected [{'; '.join(t.injected)}] counted {t.counted} "
                      f"lost={t.lost} doubled={t.doubled}")
    tr.write_line(f"total: lost={sum(t.lost for t in _TALLIES)} "
                  f"doubled={sum(t.doubled for t in _TALLIES)}")


@pytest.fixture(scope="session")
def own_pg() -> Iterator[OwnPostgres]:
    """A PostgreSQL server of the suite's own, started; tests may stop it (and must start it
    again, which `pg_db` checks)."""
    server = OwnPostgres()
    server.start()
    yield server
    server.close()


@pytest.fixture
async def pg_db(own_pg: OwnPostgres) -> AsyncIterator[str]:
    try:
        own_pg.start()  # a failed test may have left it stopped
    except Exception:
        pass
    yield await own_pg.database()


@pytest.fixture
async def pg_sessions(pg_db: str):  # type: ignore[no-untyped-def]
    engine = make_engine(pg_db)
    yield session_factory(engine)
    await engine.dispose()
