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
    body = {"event_id": f"ev-{text}", "chat_id": "tab1", "text": text}
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
        r = await client.post("/api/vote", json={"answer_id": answer_id, "rating": -1})
        assert r.status_code == 200
        r = await client.post("/api/correction", json={
            "answer_id": answer_id, "text": "Paris is the capital."})
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
        body = {"event_id": "e1", "chat_id": "c", "text": "hi"}
        assert (await client.post("/api/chat", json=body)).status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        assert (await client.post("/api/chat", json=body, headers=bad)).status_code == 401
        events = await ask(client, "hi", Authorization="Bearer s3cret")
        assert events[-1] == {"type": "done", "text": "Echo: hi", "answer_id": 2}


async def test_webchat_is_absent_unless_enabled(db_url: str, model_dir: Path) -> None:
    services = await build_services(settings_for(db_url, model_dir), backend=ScriptedBackend())
    async with serve_app(build_app(services, webchat=False)) as url, \
            httpx.AsyncClient(base_url=url) as client:
        body = {"event_id": "e1", "chat_id": "c", "text": "hi"}
        assert (await client.post("/api/chat", json=body)).status_code == 404
        assert (await client.get("/healthz")).json() == {"status": "ok"}


async def test_feedback_on_unknown_answer_is_404(db_url: str, model_dir: Path) -> None:
    services = await build_services(settings_for(db_url, model_dir), backend=ScriptedBackend())
    async with serve_app(build_app(services, webchat=True)) as url, \
            httpx.AsyncClient(base_url=url) as client:
        r = await client.post("/api/vote", json={"answer_id": 999, "rating": 1})
        assert r.status_code == 404
        r = await client.post("/api/vote", json={"answer_id": 1, "rating": 5})
        assert r.status_code == 422


async def test_a_tab_closed_mid_answer_stops_it_and_closes_the_turn(db_url: str,
                                                                     model_dir: Path) -> None:
    backend = ScriptedBackend(answer=lambda r: "one two three four five six seven eight",
                              chunk=4, delay=0.2)
    services = await build_services(settings_for(db_url, model_dir), backend=backend)
    body = {"event_id": "ev-1", "chat_id": "tab1", "text": "hello?"}
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


def uid_of(client: httpx.AsyncClient) -> str:
    return client.cookies["chatloop_id"].split(".")[0]


async def test_each_browser_is_issued_its_own_signed_identity(db_url: str,
                                                               model_dir: Path) -> None:
    backend = ScriptedBackend()
    services = await build_services(settings_for(db_url, model_dir, webchat_secret="k" * 32),
                                    backend=backend)
    async with serve_app(build_app(services, webchat=True)) as url, \
            httpx.AsyncClient(base_url=url) as mine, httpx.AsyncClient(base_url=url) as other:
        page = await mine.get("/chat")
        cookie = page.headers["set-cookie"]
        assert cookie.startswith("chatloop_id=") and "HttpOnly" in cookie
        assert "SameSite=strict" in cookie and "Path=/" in cookie
        assert "set-cookie" not in (await mine.get("/chat")).headers  # kept, not reissued
        [*_, done] = await ask(mine, "When do you open?")
        answer = done["answer_id"]

        # another browser, same tab id: its own conversation, a new identity at its first call
        body = {"event_id": "ev-When do you open?", "chat_id": "tab1", "text": "And Sundays?"}
        async with other.stream("POST", "/api/chat", json=body) as r:
            assert "chatloop_id=" in r.headers["set-cookie"]
            assert [json.loads(line) async for line in r.aiter_lines()][-1]["type"] == "done"
        assert uid_of(other) != uid_of(mine)
        assert [m.content for m in backend.requests[-1].messages[1:]] == ["And Sundays?"]

        missing = await other.post("/api/vote", json={"answer_id": answer + 100, "rating": 1})
        for path, extra in (("/api/vote", {"rating": -1}), ("/api/correction", {"text": "9."})):
            r = await other.post(path, json={"answer_id": answer, **extra})
            assert (r.status_code, r.json()) == (404, {"detail": f"no answer with id {answer}"})
        assert (missing.status_code, missing.json()) == (
            404, {"detail": f"no answer with id {answer + 100}"})

        # a tampered cookie is nobody: a new identity, which may not touch my answer either
        forged = {"chatloop_id": f"{uid_of(mine)}.{'A' * 43}"}
        async with httpx.AsyncClient(base_url=url, cookies=forged) as tampered:
            r = await tampered.post("/api/vote", json={"answer_id": answer, "rating": -1})
            assert r.status_code == 404
            r = await tampered.post("/api/chat", json={**body, "event_id": "ev-3"})
            issued = r.cookies["chatloop_id"].split(".")[0]
            assert issued not in (uid_of(mine), uid_of(other))

        assert (await mine.post("/api/vote", json={"answer_id": answer, "rating": 1,
                                                   "user_id": "someone-else"})).status_code == 200
    async with services.sessions() as s:
        [fb] = (await s.execute(select(Feedback))).scalars().all()
        authors = (await s.execute(select(Message.author_id).where(Message.role == "user")
                                   .order_by(Message.id))).scalars().all()
    assert fb.voter_id == f"web:{uid_of(mine)}"
    assert authors[:2] == [f"web:{uid_of(mine)}", f"web:{uid_of(other)}"]
    assert authors[2] == f"web:{issued}"


async def test_the_answer_says_which_adapter_answered(db_url: str, model_dir: Path) -> None:
    backend = ScriptedBackend()
    backend.adapters.add("fb-v7")
    for pinned, expected in ((None, None), ("fb-v7", "fb-v7"), ("gone", None)):
        settings = settings_for(db_url, model_dir, adapter=pinned)
        services = await build_services(settings, backend=backend)
        async with serve_app(build_app(services, webchat=True)) as url, \
                httpx.AsyncClient(base_url=url) as client:
            await client.get("/chat")  # a browser: the identity cookie first
            events = await ask(client, f"hi {pinned}")
        assert [e["type"] for e in events[-2:]] == ["route", "done"]
        assert events[-2]["adapter"] == expected  # an adapter not loaded: the base model


async def test_the_demo_operator_at_the_browser_is_trusted(db_url: str, model_dir: Path) -> None:
    for operator, status in ((False, "pending"), (True, "approved")):
        settings = settings_for(db_url, model_dir)
        services = await build_services(settings, backend=ScriptedBackend())
        async with serve_app(build_app(services, webchat=True, web_operator=operator)) as url, \
                httpx.AsyncClient(base_url=url) as client:
            await client.get("/chat")
            done = (await ask(client, f"operator {operator}?"))[-1]
            r = await client.post("/api/correction", json={
                "answer_id": done["answer_id"], "text": "Ask the front desk."})
        assert (r.status_code, r.json()["review_status"]) == (200, status)
