"""Registry, sticky canary routing, promotion and rollback, adapter sync after restarts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from sqlalchemy import update

from chatloop.app import adapter_source
from feedback.canary import CanaryPolicy, Decision, Votes, decide, evaluate_canary
from feedback.policy import DatasetPolicy
from inference.base import ChatMessage, Finished, GenerationRequest
from inference.registry import AdapterRegistry, DrainingBackend, in_canary
from storage import adapters
from storage.models import AdapterStatus, Message, utcnow
from tests.conftest import ROOT
from tests.fakes.inference import ScriptedBackend
from tests.feedback.conftest import Asker, make_core

POLICY = CanaryPolicy(min_votes=20, max_votes=500, margin=0.05)
RULES = DatasetPolicy()  # the dataset's vote rules, defaults: two voters, a cap, quarantine


async def add(sessions, name: str, status: AdapterStatus, parent: str | None = None) -> None:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        s.add(adapters.new_version(name=name, path=f"/adapters/{name}", rank=8,
                                   parent_name=parent, run_id=None,
                                   dataset_hash="h", metrics={}, status=status))
        await s.commit()


async def statuses(sessions) -> dict[str, str]:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        return {v.name: v.status for v in await adapters.all_versions(s)}


def registry(sessions, backend=None, **kw) -> AdapterRegistry:  # type: ignore[no-untyped-def]
    """The serving-side registry over `backend`, reading the adapter versions in storage."""
    return AdapterRegistry(backend or ScriptedBackend(), source=adapter_source(sessions), **kw)


@pytest.mark.parametrize(("canary", "control", "expected"), [
    (Votes(10, 0), Votes(100, 50), Decision.WAIT),  # too few canary votes
    (Votes(400, 40), Votes(400, 40), Decision.PROMOTE),  # same rate, enough evidence
    (Votes(60, 30), Votes(60, 6), Decision.ROLLBACK),  # clearly worse
    (Votes(100, 10), Votes(100, 10), Decision.WAIT),  # too little evidence for the margin
    (Votes(500, 100), Votes(40, 6), Decision.ROLLBACK),  # never proved itself by max_votes
])
def test_decision_is_a_statistical_test(canary: Votes, control: Votes, expected: Decision) -> None:
    assert decide(canary, control, POLICY) == expected


async def test_canary_slice_is_sticky_and_sized(sessions) -> None:  # type: ignore[no-untyped-def]
    await add(sessions, "fb-v1", AdapterStatus.ACTIVE)
    await add(sessions, "fb-v2", AdapterStatus.CANARY)
    router = registry(sessions, canary_percent=20, refresh_s=60)
    routes = [await router.route(c) for c in range(2000)]
    assert set(routes) == {"fb-v1", "fb-v2"}
    assert 0.16 < routes.count("fb-v2") / len(routes) < 0.24
    assert [await router.route(c) for c in range(2000)] == routes  # sticky
    assert all((r == "fb-v2") == in_canary(c, "fb-v2", 20) for c, r in enumerate(routes))


class GatedBackend(ScriptedBackend):
    """list_adapters waits until the test opens the gate (a slow vLLM during a refresh)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def list_adapters(self) -> list[str]:
        await self.gate.wait()
        return await super().list_adapters()


async def test_a_refresh_never_holds_up_routing(sessions) -> None:  # type: ignore[no-untyped-def]
    await add(sessions, "fb-v1", AdapterStatus.ACTIVE)
    backend = GatedBackend()
    backend.gate.set()
    router = registry(sessions, backend, canary_percent=100, refresh_s=0)
    assert await router.route(1) == "fb-v1"  # the first request waits for the registry
    assert backend.adapters == {"fb-v1"}
    backend.gate.clear()  # the backend now hangs on every list_adapters
    await add(sessions, "fb-v2", AdapterStatus.CANARY, parent="fb-v1")
    for _ in range(3):  # routed at once, on the routes the router has, while it refreshes
        assert await asyncio.wait_for(router.route(1), timeout=5) == "fb-v1"
    backend.gate.set()
    for _ in range(1000):  # once the refresh has loaded fb-v2, requests go there
        if await router.route(1) == "fb-v2":
            break
        await asyncio.sleep(0.01)
    assert await router.route(1) == "fb-v2" and "fb-v2" in backend.adapters
    await router.aclose()


async def regulars(sessions, users: Asker, n: int = 20) -> list[str]:  # type: ignore[no-untyped-def]
    """`n` voters who have been around for a month (not new, so no burst of them)."""
    voters = [f"test:regular{i}" for i in range(n)]
    for v in voters:
        await users.ask("hello", user=v)
    async with sessions() as s:
        await s.execute(update(Message).where(Message.author_id.in_(voters))
                        .values(created_at=utcnow() - timedelta(days=30)))
        await s.commit()
    return voters


async def _simulate(sessions, tokenizer, *, canary_down: float, active_down: float,  # type: ignore[no-untyped-def]
                    conversations: int = 120) -> None:
    """Each answer judged by two regulars (a group chat), with a deterministic 👎 share."""
    backend = ScriptedBackend(adapters={"fb-v1", "fb-v2"})
    core = make_core(sessions, tokenizer, backend,
                     router=registry(sessions, backend, canary_percent=50, refresh_s=0))
    users = Asker(core)
    voters = await regulars(sessions, users)
    counts = {"fb-v1": 0, "fb-v2": 0}
    for i in range(conversations):
        answer = await users.ask(f"question {i}?")
        adapter = backend.requests[-1].adapter
        assert adapter is not None
        rate = canary_down if adapter == "fb-v2" else active_down
        counts[adapter] += 1
        down = (counts[adapter] % 10) < rate * 10
        for voter in (voters[2 * i % len(voters)], voters[(2 * i + 1) % len(voters)]):
            await core.vote(answer_id=answer, voter_id=voter, rating=-1 if down else 1,
                            source="test")


async def test_canary_with_a_good_rate_is_promoted(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    await add(sessions, "fb-v1", AdapterStatus.ACTIVE)
    await add(sessions, "fb-v2", AdapterStatus.CANARY, parent="fb-v1")
    await _simulate(sessions, tokenizer, canary_down=0.1, active_down=0.2)
    outcome = await evaluate_canary(sessions, POLICY, rules=RULES)
    assert outcome.decision == Decision.PROMOTE and outcome.canary_votes.n > 40
    assert await statuses(sessions) == {"fb-v1": "retired", "fb-v2": "active"}
    router = registry(sessions, canary_percent=50)
    assert {await router.route(c) for c in range(50)} == {"fb-v2"}


async def test_canary_with_a_worse_rate_is_rolled_back(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    await add(sessions, "fb-v1", AdapterStatus.ACTIVE)
    await add(sessions, "fb-v2", AdapterStatus.CANARY, parent="fb-v1")
    await _simulate(sessions, tokenizer, canary_down=0.6, active_down=0.1)
    assert (await evaluate_canary(sessions, POLICY, rules=RULES)).decision == Decision.ROLLBACK
    assert await statuses(sessions) == {"fb-v1": "active", "fb-v2": "rejected"}
    router = registry(sessions, canary_percent=50)
    assert {await router.route(c) for c in range(50)} == {"fb-v1"}


async def test_one_voters_thirty_thumbs_up_do_not_promote_the_canary(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The canary counts votes by the dataset's rule: an answer needs two voters (or a
    reviewer), so one enthusiast's thirty 👍 on thirty canary answers are no evidence."""
    await add(sessions, "fb-v1", AdapterStatus.ACTIVE)
    await add(sessions, "fb-v2", AdapterStatus.CANARY, parent="fb-v1")
    backend = ScriptedBackend(adapters={"fb-v1", "fb-v2"})
    core = make_core(sessions, tokenizer, backend,
                     router=registry(sessions, backend, canary_percent=50, refresh_s=0))
    users = Asker(core)
    fan, *others = await regulars(sessions, users)
    served = {"fb-v1": 0, "fb-v2": 0}
    i = 0
    while served["fb-v2"] < 30 or served["fb-v1"] < 30:
        answer = await users.ask(f"question {i}?")
        adapter = backend.requests[-1].adapter
        i += 1
        if served[adapter] >= 30:
            continue
        served[adapter] += 1
        if adapter == "fb-v2":
            await core.vote(answer_id=answer, voter_id=fan, rating=1, source="test")
        else:  # the active adapter: judged by two regulars each, one in five 👎
            for voter in others[served[adapter] % 9 * 2:][:2]:
                await core.vote(answer_id=answer, voter_id=voter,
                                rating=-1 if served[adapter] % 5 == 0 else 1, source="test")
    outcome = await evaluate_canary(sessions, POLICY, rules=RULES)
    assert outcome.decision == Decision.WAIT and outcome.canary_votes == Votes(0, 0)
    assert outcome.control_votes == Votes(30, 6)
    assert await statuses(sessions) == {"fb-v1": "active", "fb-v2": "canary"}
    # counted vote by vote, as before, they would have promoted it
    assert decide(Votes(30, 0), outcome.control_votes, POLICY) == Decision.PROMOTE


async def test_rollback_restores_the_parent_and_promote_retires_the_active(sessions) -> None:  # type: ignore[no-untyped-def]
    await add(sessions, "fb-v1", AdapterStatus.RETIRED)
    await add(sessions, "fb-v2", AdapterStatus.ACTIVE, parent="fb-v1")
    async with sessions() as s:
        assert await adapters.rollback(s) == ("fb-v2", "fb-v1")
        await adapters.promote(s, name="fb-v2")
        with pytest.raises(adapters.RegistryError):
            await adapters.promote(s, name="fb-v404")
    assert await statuses(sessions) == {"fb-v1": "retired", "fb-v2": "active"}


async def test_sync_reloads_after_a_restart_and_unloads_only_drained_adapters(sessions) -> None:  # type: ignore[no-untyped-def]
    await add(sessions, "fb-v1", AdapterStatus.ACTIVE)
    await add(sessions, "fb-v2", AdapterStatus.CANARY)
    restarted = registry(sessions, ScriptedBackend(delay=0.05),  # nothing loaded
                         drain_grace=timedelta(0))
    report = await restarted.sync()
    assert sorted(report.loaded) == ["fb-v1", "fb-v2"]
    request = GenerationRequest([ChatMessage("user", "a long question " * 4)], max_tokens=8,
                                adapter="fb-v1")
    stream = restarted.backend.stream(request)
    await anext(stream)  # a request on fb-v1 is in flight
    async with sessions() as s:
        await adapters.promote(s, name="fb-v2")  # fb-v1 is retired
    assert (await restarted.sync()).waiting == ["fb-v1"]
    assert "fb-v1" in await restarted.backend.list_adapters()
    async for _ in stream:
        pass
    report = await restarted.sync()
    assert report.unloaded == ["fb-v1"] and await restarted.backend.list_adapters() == ["fb-v2"]


async def test_a_slow_drain_waits_for_the_grace_period(sessions) -> None:  # type: ignore[no-untyped-def]
    await add(sessions, "fb-v1", AdapterStatus.RETIRED)
    backend = ScriptedBackend(adapters={"fb-v1"})
    report = await registry(sessions, backend, drain_grace=timedelta(minutes=5)).sync()
    assert report.waiting == ["fb-v1"] and backend.adapters == {"fb-v1"}


def chatloop(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatloop.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CHATLOOP_DATABASE_URL": url})


async def test_adapters_cli_lists_promotes_and_rolls_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from storage.db import make_engine, session_factory
    from storage.migrate import upgrade_async

    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    await upgrade_async(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    await add(sessions, "fb-v1", AdapterStatus.ACTIVE)
    await add(sessions, "fb-v2", AdapterStatus.CANARY, parent="fb-v1")
    listed = chatloop(url, "adapters", "list")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [
        ["fb-v1", "active"], ["fb-v2", "canary"]]
    assert chatloop(url, "adapters", "promote", "fb-v2").returncode == 0
    assert await statuses(sessions) == {"fb-v1": "retired", "fb-v2": "active"}
    done = chatloop(url, "adapters", "rollback")
    assert done.returncode == 0 and "active: fb-v1" in done.stdout
    bad = chatloop(url, "adapters", "promote", "fb-v404")
    assert bad.returncode == 2 and "no adapter named 'fb-v404'" in bad.stderr
    assert chatloop(url, "runs").returncode == 0
    await engine.dispose()


async def test_draining_backend_closes_the_inner_stream_when_closed() -> None:
    closed: list[bool] = []

    class Tracking(ScriptedBackend):
        async def stream(self, request):  # type: ignore[no-untyped-def]
            try:
                async for ev in super().stream(request):
                    yield ev
            finally:
                closed.append(True)

    backend = DrainingBackend(Tracking())
    request = GenerationRequest([ChatMessage("user", "hello there")], max_tokens=8)
    async with contextlib.aclosing(backend.stream(request)) as stream:
        async for ev in stream:
            if isinstance(ev, Finished):
                break  # as the core does: stop at Finished, close the stream
    assert closed == [True] and backend.inflight[None] == 0
