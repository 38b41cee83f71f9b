"""Adapters on two real vLLM CPU servers behind one ReplicaBackend: loaded through the registry
they reach both, a conversation stays on one server, a killed server's conversations are
answered by the other, and a server started again gets the adapters back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inference.base import ChatMessage, Finished, GenerationRequest, TextDelta
from inference.openai_backend import OpenAIBackend
from inference.registry import AdapterRef, AdapterRegistry, ServingState
from inference.replicas import ReplicaBackend, preference
from tests.fakes.lora import make_lora_adapter
from tests.fakes.vllm_server import SERVED_NAME, VLLMServer, vllm_server

pytestmark = pytest.mark.slow
ADAPTER = "fb-v1"


class Fleet:
    """Two vLLM servers, started together once for the module; one may be replaced."""

    def __init__(self, model_dir: Path, log_dir: Path) -> None:
        self.model_dir, self.log_dir = model_dir, log_dir
        self.stack = contextlib.ExitStack()
        self.servers: list[VLLMServer] = []

    def start(self, port: int | None = None) -> VLLMServer:
        return self.stack.enter_context(vllm_server(self.model_dir, self.log_dir, port=port))


@pytest.fixture(scope="module")
def fleet(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(model_dir, tmp_path_factory.mktemp("vllm"))
    with fleet.stack:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:  # both start at once: start-up is the slow part
            fleet.servers = list(pool.map(lambda _: fleet.start(), range(2)))
        yield fleet


@pytest.fixture(scope="module")
def adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_adapter(model_dir, tmp_path_factory.mktemp("adapters"), rank=8, seed=5,
                             std=0.03)


def backend_for(fleet: Fleet) -> ReplicaBackend:
    return ReplicaBackend([OpenAIBackend(base_url=s.base_url, model_name=SERVED_NAME,
                                         max_retries=0, connect_timeout=2)
                           for s in fleet.servers], recheck_s=3600)  # checks: by the test


async def served(server: VLLMServer) -> set[str]:
    async with httpx.AsyncClient(timeout=10) as client:
        models = (await client.get(f"{server.base_url}/models")).json()["data"]
    return {m["id"] for m in models} - {SERVED_NAME}


async def finished_requests(server: VLLMServer) -> float:
    """The server's own count of requests it finished (its Prometheus metrics)."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"http://127.0.0.1:{server.port}/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


async def ask(backend: ReplicaBackend, conversation: int, adapter: str | None = ADAPTER) -> str:
    request = GenerationRequest([ChatMessage("user", "Name a colour.")], max_tokens=6,
                                adapter=adapter, conversation_id=conversation)
    events = [e async for e in backend.stream(request)]
    assert isinstance(events[-1], Finished)
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def which_served(fleet: Fleet, backend: ReplicaBackend, conversation: int,
                       among: tuple[int, ...] = (0, 1)) -> list[int]:
    """Ask once; the indexes of the servers (of `among`) whose finished count went up."""
    servers = [fleet.servers[i] for i in among]
    before = [await finished_requests(s) for s in servers]
    assert (await ask(backend, conversation)).strip()
    deadline = time.monotonic() + 10  # the count may trail the stream's last chunk
    while True:
        after = [await finished_requests(s) for s in servers]
        if sum(after) > sum(before) or time.monotonic() > deadline:
            return [among[k] for k in range(len(servers)) if after[k] > before[k]]
        await asyncio.sleep(0.1)


def conversations_of(fleet: Fleet, server: int, n: int = 2) -> list[int]:
    urls = [s.base_url for s in fleet.servers]
    return [c for c in range(100) if preference(c, urls)[0] == server][:n]


async def test_an_adapter_loaded_through_the_registry_reaches_both(fleet: Fleet,
                                                                   adapter: Path) -> None:
    backend = backend_for(fleet)

    async def state() -> ServingState:
        return ServingState(active=AdapterRef(ADAPTER, str(adapter), 8))

    registry = AdapterRegistry(backend, source=state)
    report = await registry.sync()
    assert report.loaded == [ADAPTER]
    assert [await served(s) for s in fleet.servers] == [{ADAPTER}, {ADAPTER}]
    assert await registry.route(1) == ADAPTER
    await registry.aclose()
    await backend.aclose()


async def test_a_conversation_stays_on_one_server(fleet: Fleet, adapter: Path) -> None:
    backend = backend_for(fleet)
    await backend.load_adapter(ADAPTER, str(adapter))  # loaded where missing
    for server in (0, 1):
        for conversation in conversations_of(fleet, server):
            assert [await which_served(fleet, backend, conversation) for _ in range(3)] == [
                [server]] * 3
    await backend.aclose()


async def test_a_killed_server_s_conversations_go_to_the_other_and_it_gets_adapters_back(
        fleet: Fleet, adapter: Path) -> None:
    backend = backend_for(fleet)
    await backend.load_adapter(ADAPTER, str(adapter))  # loaded where missing
    victim = fleet.servers[1]
    moved = conversations_of(fleet, 1)
    victim.kill()
    for conversation in moved:  # answered by server 0, with the adapter
        assert await which_served(fleet, backend, conversation, among=(0,)) == [0]
    assert backend.down() == [victim.base_url]
    await backend.health()  # one up: healthy, the other reported down
    assert backend.down() == [victim.base_url]

    fleet.servers[1] = await asyncio.to_thread(fleet.start, victim.port)  # same port, empty
    assert await served(fleet.servers[1]) == set()
    await backend.health()  # back: the adapter is loaded on it before it serves
    assert backend.down() == []
    assert await served(fleet.servers[1]) == {ADAPTER}
    for conversation in moved:  # home again
        assert await which_served(fleet, backend, conversation) == [1]
    await backend.aclose()
