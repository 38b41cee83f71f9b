"""The serving-side adapter registry: load/unload records, sync, sticky canary routing, drain."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from inference.base import ChatMessage, GenerationRequest
from inference.errors import AdapterRejected
from inference.registry import (
    AdapterRef,
    AdapterRegistry,
    AdapterState,
    Retired,
    ServingState,
    in_canary,
)
from tests.fakes.inference import ScriptedBackend

LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)


class Source:
    """The desired state, as a test sets it (the composition root reads storage instead)."""

    def __init__(self, state: ServingState | None = None) -> None:
        self.state = state or ServingState()
        self.reads = 0

    async def __call__(self) -> ServingState:
        self.reads += 1
        return self.state


class GatedLoads(ScriptedBackend):
    """load_adapter waits until the test opens the gate (a slow vLLM load)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()

    async def load_adapter(self, name: str, path: str) -> None:
        await self.gate.wait()
        await super().load_adapter(name, path)


def peft_dir(tmp_path: Path, name: str, rank: int) -> str:
    path = tmp_path / name
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return str(path)


def ref(name: str) -> AdapterRef:
    return AdapterRef(name, f"/adapters/{name}", 8)


async def test_a_canary_is_routed_to_only_once_it_is_loaded() -> None:
    backend = GatedLoads()
    source = Source(ServingState(active=ref("fb-v1")))
    registry = AdapterRegistry(backend, source=source, canary_percent=100, refresh_s=0)
    assert await registry.route(1) == "fb-v1"  # the first request waits for the load
    backend.gate.clear()  # vLLM now takes its time loading
    source.state = ServingState(active=ref("fb-v1"), canary=ref("fb-v2"))
    for _ in range(5):  # routed at once, on the routes it has, while fb-v2 loads
        assert await asyncio.wait_for(registry.route(1), timeout=5) == "fb-v1"
        await asyncio.sleep(0.01)
    assert "fb-v2" not in backend.adapters
    backend.gate.set()
    for _ in range(1000):
        if await registry.route(1) == "fb-v2":
            break
        await asyncio.sleep(0.01)
    assert await registry.route(1) == "fb-v2" and "fb-v2" in backend.adapters
    assert registry.get("fb-v2").status == AdapterState.LOADED  # type: ignore[union-attr]
    await registry.aclose()


async def test_the_canary_slice_is_sticky_and_sized() -> None:
    source = Source(ServingState(active=ref("fb-v1"), canary=ref("fb-v2")))
    registry = AdapterRegistry(ScriptedBackend(), source=source, canary_percent=20,
                               refresh_s=60)
    routes = [await registry.route(c) for c in range(2000)]
    assert set(routes) == {"fb-v1", "fb-v2"}
    assert 0.16 < routes.count("fb-v2") / len(routes) < 0.24
    assert [await registry.route(c) for c in range(2000)] == routes  # sticky
    assert all((r == "fb-v2") == in_canary(c, "fb-v2", 20) for c, r in enumerate(routes))
    assert source.reads == 1  # refreshed every 60 s, not per request


async def test_a_retired_adapter_is_unloaded_only_after_its_streams_end() -> None:
    source = Source(ServingState(active=ref("fb-v1")))
    registry = AdapterRegistry(ScriptedBackend(delay=0.05), source=source,
                               drain_grace=timedelta(0))
    assert (await registry.sync()).loaded == ["fb-v1"]
    request = GenerationRequest([ChatMessage("user", "a long question " * 4)], max_tokens=8,
                                adapter="fb-v1")
    stream = registry.backend.stream(request)
    await anext(stream)  # a request on fb-v1 is in flight
    source.state = ServingState(active=ref("fb-v2"), retired=(Retired("fb-v1", LONG_AGO),))
    report = await registry.sync()
    assert report.loaded == ["fb-v2"] and report.waiting == ["fb-v1"]
    assert registry.get("fb-v1").status == AdapterState.DRAINING  # type: ignore[union-attr]
    assert await registry.backend.list_adapters() == ["fb-v1", "fb-v2"]
    async for _ in stream:
        pass
    report = await registry.sync()
    assert report.unloaded == ["fb-v1"] and await registry.backend.list_adapters() == ["fb-v2"]
    assert registry.get("fb-v1") is None


async def test_the_drain_grace_covers_other_processes_requests() -> None:
    backend = ScriptedBackend(adapters={"fb-v1"})
    just_now = Retired("fb-v1", datetime.now(UTC))
    registry = AdapterRegistry(backend, source=Source(ServingState(retired=(just_now,))),
                               drain_grace=timedelta(minutes=5))
    assert (await registry.sync()).waiting == ["fb-v1"] and backend.adapters == {"fb-v1"}


async def test_an_adapter_above_the_max_rank_is_refused_and_not_routed_to(tmp_path) -> None:  # type: ignore[no-untyped-def]
    backend = ScriptedBackend()
    ok, big = peft_dir(tmp_path, "fb-v1", 8), peft_dir(tmp_path, "fb-v2", 64)
    source = Source(ServingState(active=AdapterRef("fb-v1", ok),
                                 canary=AdapterRef("fb-v2", big)))
    registry = AdapterRegistry(backend, source=source, canary_percent=100, max_rank=16)
    with pytest.raises(AdapterRejected, match="max_lora_rank 16"):
        await registry.load("fb-v2", big)
    assert "fb-v2" not in backend.adapters  # never reached the backend
    assert registry.get("fb-v2").status == AdapterState.REFUSED  # type: ignore[union-attr]
    report = await registry.sync()
    assert report.loaded == ["fb-v1"] and report.refused == ["fb-v2"]
    assert {await registry.route(c) for c in range(20)} == {"fb-v1"}  # the slice stays on v1
    assert registry.get("fb-v1").rank == 8  # type: ignore[union-attr]  # read from its files


async def test_load_unload_list_like_vllm_serving_models(tmp_path) -> None:  # type: ignore[no-untyped-def]
    backend = ScriptedBackend(adapters={"trainer-loaded"})
    registry = AdapterRegistry(backend, source=Source(), max_rank=16)
    path = peft_dir(tmp_path, "fb-v1", 4)
    record = await registry.load("fb-v1", path)
    assert (record.name, record.path, record.rank, record.status) == (
        "fb-v1", path, 4, AdapterState.LOADED)
    assert await registry.load("fb-v1", path) == record  # loading it again is a no-op
    with pytest.raises(AdapterRejected, match="taken"):  # a name is never reused
        await registry.load("fb-v1", peft_dir(tmp_path, "other", 4))
    await registry.sync()  # what another process loaded is known after a sync
    assert {r.name for r in registry.adapters()} == {"fb-v1", "trainer-loaded"}
    assert await registry.unload("fb-v1") and backend.adapters == {"trainer-loaded"}
    assert registry.get("fb-v1") is None


async def test_a_backend_restart_reloads_what_is_served() -> None:
    backend = ScriptedBackend()
    source = Source(ServingState(active=ref("fb-v1"), canary=ref("fb-v2")))
    registry = AdapterRegistry(backend, source=source)
    assert sorted((await registry.sync()).loaded) == ["fb-v1", "fb-v2"]
    backend.adapters.clear()  # vLLM restarted: nothing loaded
    assert sorted((await registry.sync()).loaded) == ["fb-v1", "fb-v2"]
    assert backend.adapters == {"fb-v1", "fb-v2"}


async def test_a_rolled_back_adapter_still_draining_is_served_again() -> None:
    backend = ScriptedBackend(adapters={"fb-v1", "fb-v2"})
    source = Source(ServingState(active=ref("fb-v2"),
                                 retired=(Retired("fb-v1", datetime.now(UTC)),)))
    registry = AdapterRegistry(backend, source=source, refresh_s=0)
    assert await registry.route(1) == "fb-v2"
    assert registry.get("fb-v1").status == AdapterState.DRAINING  # type: ignore[union-attr]
    source.state = ServingState(active=ref("fb-v1"),  # rollback: the parent is active again
                                retired=(Retired("fb-v2", datetime.now(UTC)),))
    registry.invalidate()
    assert await registry.route(1) == "fb-v1"
    assert registry.get("fb-v1").status == AdapterState.LOADED  # type: ignore[union-attr]
