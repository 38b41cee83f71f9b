"""vLLM SIGKILLed in the middle of an answer, then started again on its port (the real vLLM CPU
server, a gateway with the web chat, an active and a canary adapter): the user gets the apology
once, the turn is stored as failed (`unavailable`), /readyz is 503 while vLLM is away and 200
once it is back with both adapters loaded again, and the next question is answered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from bots.core import APOLOGIES
from chatloop.app import build_app, build_services
from chatloop.settings import Settings
from storage import adapters as versions
from storage.db import make_engine, session_factory
from storage.migrate import upgrade_async
from storage.models import AdapterStatus, InboundEvent, Message
from tests.fakes.lora import make_lora_adapter
from tests.fakes.servers import serve_app
from tests.fakes.vllm_server import SERVED_NAME, VLLMServer, free_port, vllm_server
from tests.faults.conftest import Tally

pytestmark = [pytest.mark.slow, pytest.mark.faults]
ACTIVE, CANARY = "fb-v1", "fb-v2"


async def until(check: Callable[[], Awaitable[Any]], *, within: float, what: str) -> Any:
    """Poll the async `check` until it returns something truthy (and return that)."""
    deadline = time.monotonic() + within
    while not (result := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f} s waiting for {what}")
        await asyncio.sleep(0.25)
    return result


async def served(server: VLLMServer) -> set[str]:
    """The adapters the server has loaded (its /v1/models, less the base model)."""
    async with httpx.AsyncClient(timeout=10) as client:
        models = (await client.get(f"{server.base_url}/models")).json()["data"]
    return {m["id"] for m in models} - {SERVED_NAME}


async def register(db_url: str, adapters: dict[str, tuple[Path, AdapterStatus]]) -> None:
    engine = make_engine(db_url)
    async with session_factory(engine)() as s:
        for name, (path, status) in adapters.items():
            s.add(versions.new_version(name=name, path=str(path), rank=8, parent_name=None,
                                       run_id=None, dataset_hash="0" * 64, metrics={},
                                       status=status))
        await s.commit()
    await engine.dispose()


async def ask(client: httpx.AsyncClient, event_id: str, text: str,
              on_first_words: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """Ask over the web chat; `on_first_words` runs once the first words have been shown."""
    events: list[dict[str, Any]] = []
    body = {"event_id": event_id, "chat_id": "tab1", "text": text}
    async with client.stream("POST", "/api/chat", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line:
                events.append(json.loads(line))
                if sum(e["type"] == "delta" for e in events) == 1 and events[-1]["type"] == "delta":
                    on_first_words()
    return events


async def test_vllm_killed_mid_stream_apologises_once_and_recovers_its_adapters(
        model_dir: Path, tmp_path: Path, tally: Tally) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'outage.db'}"
    await upgrade_async(db_url)
    adapters_dir = tmp_path / "adapters"
    await register(db_url, {
        ACTIVE: (make_lora_adapter(model_dir, adapters_dir, rank=8, seed=1, std=0.03),
                 AdapterStatus.ACTIVE),
        CANARY: (make_lora_adapter(model_dir, adapters_dir, rank=8, seed=2, std=0.03),
                 AdapterStatus.CANARY),
    })
    port = free_port()
    with contextlib.ExitStack() as servers:
        first = await asyncio.to_thread(servers.enter_context,
                                        vllm_server(model_dir, tmp_path, port=port))
        settings = Settings.from_env_names(
            database_url=db_url, model=str(model_dir), inference_url=first.base_url,
            max_tokens=400, adapters_dir=str(adapters_dir), learn_canary_percent=50)
        services = await build_services(settings)
        assert await served(first) == {ACTIVE, CANARY}  # loaded at start-up
        async with serve_app(build_app(services, webchat=True)) as url, \
                httpx.AsyncClient(base_url=url, timeout=120) as client:
            await client.get("/chat")  # a browser: the identity cookie first

            def kill() -> None:
                first.kill()
                tally.inject("vLLM SIGKILLed once the first words of an answer were shown")

            cut = await ask(client, "ev-1", "Write a long story about a lighthouse keeper.",
                            on_first_words=kill)
            assert first.process.poll() is not None, f"no words shown before the end: {cut}"
            down = await until(lambda: _readyz(client, 503), within=30, what="/readyz 503")

            second = await asyncio.to_thread(servers.enter_context,
                                             vllm_server(model_dir, tmp_path, port=port))
            tally.inject(f"vLLM started again on port {port}")
            back = await until(lambda: _readyz(client, 200), within=60, what="/readyz 200")
            reloaded = await served(second)
            after = await ask(client, "ev-2", "What is the capital of France?")

    async with services.sessions() as s:
        answers = (await s.execute(select(Message).where(Message.role == "assistant")
                                   .order_by(Message.id))).scalars().all()
        events = (await s.execute(select(InboundEvent).order_by(InboundEvent.id))
                  ).scalars().all()
    apologies = [e["text"] for e in cut if e["type"] == "error"]
    shown = [e["text"] for e in after if e["type"] == "done"]
    route = next((e["adapter"] for e in after if e["type"] == "route"), "none")
    tally.count(deltas_before_kill=sum(e["type"] == "delta" for e in cut),
                apologies=len(apologies), readyz_down=down, readyz_back=back,
                adapters_after_restart=sorted(reloaded), next_answer_route=route,
                turns=[(a.status, a.error_kind) for a in answers],
                events=[e.status for e in events])
    tally.messages({"apology ev-1": 1, "answer ev-2": 1},
                   {"apology ev-1": len(apologies), "answer ev-2": len(shown)})
    assert apologies == [APOLOGIES["unavailable"]]
    assert not any(e["type"] == "done" for e in cut)
    assert [(a.status, a.error_kind) for a in answers] == [("failed", "unavailable"),
                                                           ("ok", None)]
    assert answers[0].text.strip()  # the words shown before the kill are kept with it
    assert [e.status for e in events] == ["failed", "done"]
    assert down["inference"] == "unavailable" and back["inference"] == "ok"
    assert reloaded == {ACTIVE, CANARY}
    assert len(shown) == 1 and shown[0].strip() and route in (ACTIVE, CANARY)
    assert tally.lost == 0 and tally.doubled == 0


async def _readyz(client: httpx.AsyncClient, status: int) -> dict[str, Any] | None:
    r = await client.get("/readyz")
    return r.json() if r.status_code == status else None
