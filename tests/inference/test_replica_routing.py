"""Several inference endpoints behind one backend: affinity, failover, adapters on each (fakes;
tests/inference/test_replicas.py does the same with two real vLLM servers)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from inference.base import ChatMessage, Finished, GenerationRequest, TextDelta
from inference.errors import BackendUnavailable
from inference.replicas import ReplicaBackend, preference
from tests.fakes.inference import ScriptedBackend
from tests.test_cli import chatloop

URLS = ["http://vllm-a:8000/v1", "http://vllm-b:8000/v1", "http://vllm-c:8000/v1"]


@dataclass
class FakeServer(ScriptedBackend):
    """A scripted server that can be stopped, and restarted without its adapters."""

    base_url: str = ""
    up: bool = True

    def _check_up(self) -> None:
        if not self.up:
            raise BackendUnavailable(f"{self.base_url} refused the connection")

    async def stream(self, request):  # type: ignore[no-untyped-def,override]
        self._check_up()
        async for event in super().stream(request):
            yield event

    async def health(self) -> None:
        self._check_up()

    async def load_adapter(self, name: str, path: str) -> None:
        self._check_up()
        await super().load_adapter(name, path)

    async def list_adapters(self) -> list[str]:
        self._check_up()
        return await super().list_adapters()

    def restart(self) -> None:
        self.up, self.adapters = True, set()


def servers(n: int = 3, **kw: object) -> list[FakeServer]:
    return [FakeServer(base_url=url, answer=lambda r, u=url: u, **kw)  # type: ignore[misc]
            for url in URLS[:n]]


async def ask(backend: ReplicaBackend, conversation: int, adapter: str | None = None) -> str:
    request = GenerationRequest([ChatMessage("user", "hi")], max_tokens=8, adapter=adapter,
                                conversation_id=conversation)
    events = [e async for e in backend.stream(request)]
    assert isinstance(events[-1], Finished)
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def test_preference_is_stable_and_moves_only_the_conversations_of_a_lost_endpoint() -> None:
    firsts = Counter(preference(c, URLS)[0] for c in range(300))
    assert all(n > 60 for n in firsts.values()) and len(firsts) == 3  # spread over all three
    assert [preference(c, URLS) for c in range(50)] == [preference(c, URLS) for c in range(50)]
    without_b = [u for u in URLS if u != URLS[1]]
    for c in range(300):
        first = URLS[preference(c, URLS)[0]]
        if first != URLS[1]:  # the others keep their endpoint
            assert without_b[preference(c, without_b)[0]] == first


async def test_a_conversation_stays_on_one_endpoint() -> None:
    backend = ReplicaBackend(servers())
    for conversation in range(20):
        answers = {await ask(backend, conversation) for _ in range(4)}
        assert answers == {URLS[preference(conversation, URLS)[0]]}


async def test_a_down_endpoint_s_conversations_fail_over_and_come_back() -> None:
    fleet = servers()
    backend = ReplicaBackend(fleet, recheck_s=0.0)
    await backend.load_adapter("fb-v1", "/adapters/fb-v1")
    mine = [c for c in range(60) if preference(c, URLS)[0] == 1]
    others = {c: await ask(backend, c) for c in range(60) if c not in mine}
    fleet[1].up = False
    for c in mine:  # answered elsewhere, the adapter there too
        assert await ask(backend, c, adapter="fb-v1") == URLS[preference(c, URLS)[1]]
    assert backend.down() == [URLS[1]]
    assert {c: await ask(backend, c) for c in others} == others  # nobody else moved
    fleet[1].restart()  # back, empty: the adapter is loaded on it before it serves again
    await backend.health()
    assert backend.down() == [] and fleet[1].adapters == {"fb-v1"}
    assert {await ask(backend, c, adapter="fb-v1") for c in mine} == {URLS[1]}
    await backend.aclose()


async def test_health_passes_while_one_endpoint_is_up_and_names_the_rest() -> None:
    fleet = servers(2)
    backend = ReplicaBackend(fleet)
    fleet[0].up = False
    await backend.health()
    assert backend.down() == [URLS[0]]
    fleet[1].up = False
    with pytest.raises(BackendUnavailable, match="all 2"):
        await backend.health()
    with pytest.raises(BackendUnavailable):
        await ask(backend, 1)


async def test_adapters_reach_every_endpoint_and_a_missing_one_shows() -> None:
    fleet = servers()
    backend = ReplicaBackend(fleet)
    await backend.load_adapter("fb-v1", "/adapters/fb-v1")
    assert all(s.adapters == {"fb-v1"} for s in fleet)
    assert await backend.list_adapters() == ["fb-v1"]
    fleet[2].restart()  # restarted between two checks: the registry's sync sees it missing
    assert await backend.list_adapters() == []
    await backend.load_adapter("fb-v1", "/adapters/fb-v1")
    assert fleet[2].adapters == {"fb-v1"}
    await backend.unload_adapter("fb-v1")
    assert all(s.adapters == set() for s in fleet)


async def test_a_stream_broken_mid_answer_is_not_answered_twice() -> None:
    fleet = servers(2, fail_after=1, error=BackendUnavailable("killed"))
    backend = ReplicaBackend(fleet)
    with pytest.raises(BackendUnavailable):
        await ask(backend, 7)
    assert sum(len(s.requests) for s in fleet) == 1


def test_an_endpoint_that_is_not_a_url_stops_start_up_with_one_line() -> None:
    done = chatloop("serve", env={
        "CHATLOOP_INFERENCE_URL": "http://vllm-a:8000/v1,vllm-b:8000"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "chatloop: bad configuration: CHATLOOP_INFERENCE_URL: Value error, 'vllm-b:8000' is "
        "not an http(s) URL such as http://vllm:8000/v1 (several: comma-separated)"]


async def test_the_core_keeps_a_conversation_on_one_server(db_url: str, model_dir: Path) -> None:
    from chatloop.app import build_app, build_services
    from tests.bots.test_webchat import ask as ask_web
    from tests.bots.test_webchat import settings_for
    from tests.fakes.servers import serve_app

    fleet = servers()
    services = await build_services(settings_for(db_url, model_dir),
                                    backend=ReplicaBackend(fleet))
    async with serve_app(build_app(services, webchat=True)) as url, \
            httpx.AsyncClient(base_url=url) as client:
        await client.get("/chat")
        answers = [(await ask_web(client, f"question {n}"))[-1]["text"] for n in range(3)]
    [server] = [s for s in fleet if s.requests]
    conversations = {r.conversation_id for r in server.requests}
    assert len(server.requests) == 3 and len(conversations) == 1 and None not in conversations
    assert answers == [server.base_url] * 3
