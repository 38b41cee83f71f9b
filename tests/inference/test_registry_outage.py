"""The registry across an inference outage: a server back without its adapters (restarted)
gets the active and canary adapters again before readiness passes, and routes wait for it."""

from __future__ import annotations

import pytest

from inference.errors import BackendUnavailable
from inference.registry import AdapterRef, AdapterRegistry, ServingState
from tests.inference.test_replica_routing import FakeServer

STATE = ServingState(active=AdapterRef("fb-v1", "/adapters/fb-v1"),
                     canary=AdapterRef("fb-v2", "/adapters/fb-v2"))


async def source() -> ServingState:
    return STATE


async def test_a_restarted_server_gets_its_adapters_back_before_it_is_ready() -> None:
    server = FakeServer(base_url="http://vllm:8000/v1")
    registry = AdapterRegistry(server, source=source, canary_percent=50, refresh_s=3600)
    await registry.sync()
    assert await registry.route(1) in ("fb-v1", "fb-v2")
    server.up = False  # killed
    with pytest.raises(BackendUnavailable):
        await registry.health()
    server.restart()  # started again: up, no adapters
    await registry.health()
    assert server.adapters == {"fb-v1", "fb-v2"}
    assert {await registry.route(c) for c in range(20)} == {"fb-v1", "fb-v2"}


async def test_without_a_readiness_check_the_next_request_waits_for_a_fresh_sync() -> None:
    server = FakeServer(base_url="http://vllm:8000/v1")
    registry = AdapterRegistry(server, source=source, refresh_s=3600)
    await registry.sync()
    await registry.route(1)
    server.up = False
    with pytest.raises(BackendUnavailable):
        await registry.health()
    server.restart()
    assert await registry.route(1) == "fb-v1" and server.adapters == {"fb-v1", "fb-v2"}


async def test_a_server_that_stayed_up_is_not_synced_again() -> None:
    server = FakeServer(base_url="http://vllm:8000/v1")
    registry = AdapterRegistry(server, source=source, refresh_s=3600)
    await registry.route(1)
    server.adapters.clear()  # (only a sync would load them)
    await registry.health()
    assert server.adapters == set()
