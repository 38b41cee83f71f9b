"""The web chat end to end over HTTP: real model, real gateway, real database."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from chatloop.app import build_app, build_services
from chatloop.settings import Settings
from storage.models import Feedback, InboundEvent, Message
from tests.fakes.inference import ScriptedBackend
from tests.fakes.servers import serve_app


def settings_for(db_url: str, model_dir: Path, **kw: object) -> Settings:
    return Settings.from_env_names(database_url=db_url, model=str(model_dir), max_tokens=48, **kw)


async def ask(client: httpx.AsyncClient, text: str, **headers: str) -> list[dict]:
    body = {"event_id": f"ev-{text}", "chat_id": "tab1", "user_id": "visitor1", "text": text}
    async with client.stream("POST", "/api/chat", json=body, headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        return [json.loads(line) async for line in r.aiter_lines() if line]


@pytest.mark.slow
async def test_question_streams_answer_and_feedback_is_stored(db_url: str, model_dir: Path) -> None:
    services = await build_services(settings_for(db_url, model_dir))
    async with serve_app(build_app(services, webchat=True)) as url, \
            httpx.AsyncClient(base_url=url, timeout=120) as client:
        assert "<form" in (await client.get("/chat")).text
        events = await ask(client, "What is the capital of France?")
        deltas = [e for e in events if e["type"] == "delta"]
        done = events[-1]
        assert done["type"] == "done" and len(deltas) > 1
        assert "".join(e["text"] for e in deltas) == done["text"] and done["text"].strip()
        answer_id = done["answer_id"]
        r = await client.post("/api/vote", json={"answer_id": answer_id, "user_id": "visitor1",
                                                 "rating": -1})
        assert r.status_code == 200
        r = await client.post("/api/correction", json={
            "answer_id": answer_id, "user_id": "visitor1", "text": "Paris is the capital."})
        assert r.json()["review_status"] == "pending"
        assert (await client.get("/readyz")).json()["ready"] is True
    async with services.sessions() as s:
        msgs = (await s.execute(select(Message).order_by(Message.id))).scalars().all()
        fb = (await s.execute(select(Feedback))).scalar_one()
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[1].text == done["text"] and msgs[1].status == "ok"
    assert msgs[1].completion_tokens and msgs[1].ttft_ms is not None
    assert (fb.answer_id, fb.rating, fb.correction) == (answer_id, -1, "Paris is the capital.")


async def test_token_is_required_when_configured(db_url: str, model_dir: Path) -> None:
    settings = settings_for(db_url, model_dir, webchat_token="s3cret")
    services = await build_services(settings, backend=ScriptedBackend())
    async with serve_app(build_app(services, webchat=True)) as url, \
            httpx.AsyncClient(base_url=url) as client:
        body = {"event_id": "e1", "chat_id": "c", "user_id": "u", "text": "hi"}
        assert (await client.post("/api/chat", json=body)).status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        assert (await client.post("/api/chat", json=body, headers=bad)).status_code == 401
        events = await ask(client, "hi", Authorization="Bearer s3cret")
        assert events[-1] == {"type": "done", "text": "Echo: hi", "answer_id": 2}


async def test_webchat_is_absent_unless_enabled(db_url: str, model_dir: Path) -> None:
    services = await build_services(settings_for(db_url, model_dir), backend=ScriptedBackend())
    async with serve_app(build_app(services, webchat=False)) as url, \
            httpx.AsyncClient(base_url=url) as client:
        body = {"event_id": "e1", "chat_id": "c", "user_id": "u", "text": "hi"}
        assert (await client.post("/api/chat", json=body)).status_code == 404
        assert (await client.get("/healthz")).json() == {"status": "ok"}


async def test_feedback_on_unknown_answer_is_404(db_url: str, model_dir: Path) -> None:
    services = await build_services(settings_for(db_url, model_dir), backend=ScriptedBackend())
    async with serve_app(build_app(services, webchat=True)) as url, \
            httpx.AsyncClient(base_url=url) as client:
        r = await client.post("/api/vote", json={"answer_id": 999, "user_id": "u", "rating": 1})
        assert r.status_code == 404
        r = await client.post("/api/vote", json={"answer_id": 1, "user_id": "u", "rating": 5})
        assert r.status_code == 422


async def test_a_tab_closed_mid_answer_stops_it_and_closes_the_turn(db_url: str,
                                                                     model_dir: Path) -> None:
    backend = ScriptedBackend(answer=lambda r: "one two three four five six seven eight",
                              chunk=4, delay=0.2)
    services = await build_services(settings_for(db_url, model_dir), backend=backend)
    body = {"event_id": "ev-1", "chat_id": "tab1", "user_id": "visitor1", "text": "hello?"}
    async with serve_app(build_app(services, webchat=True)) as url, \
            httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with client.stream("POST", "/api/chat", json=body) as r:
            async for line in r.aiter_lines():
                if line and json.loads(line)["type"] == "delta":
                    break  # the first words arrive, then the tab is closed
        for _ in range(200):
            async with services.sessions() as s:
                event = (await s.execute(select(InboundEvent))).scalar_one()
            if event.status != "received":
                break
            await asyncio.sleep(0.05)
    await services.aclose()
    async with services.sessions() as s:
        answer = (await s.execute(select(Message).where(Message.role == "assistant"))
                  ).scalar_one()
    assert (event.status, answer.status, answer.error_kind) == ("failed", "failed", "client_gone")
