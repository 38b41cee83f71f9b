"""Input before trust, at the gateway's edge: body caps, the token before the body, text every
database can store, a readiness probe that is cheap to call and says little."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from fastapi import APIRouter, Request
from sqlalchemy import select

from bots.edge import BODY_CAPS, DEFAULT_BODY_CAP, KIB
from bots.gateway import create_app
from bots.webchat import PAGE
from chatloop.app import build_app, build_services
from chatloop.settings import Settings
from storage.models import Message
from tests.fakes.inference import ScriptedBackend
from tests.fakes.servers import serve_app

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def settings_for(db_url: str, model_dir: Path, **kw: object) -> Settings:
    return Settings.from_env_names(database_url=db_url, model=str(model_dir), max_tokens=48, **kw)


class Console:
    """A channel standing in for any later one (the operators' console): routes, no cap."""

    name = "console"

    def __init__(self) -> None:
        self.read: list[int] = []

    def routes(self) -> APIRouter:
        router = APIRouter()

        @router.post("/console/import")
        @router.post("/elsewhere")
        async def take(request: Request) -> dict[str, int]:
            self.read.append(len(await request.body()))
            return {"bytes": self.read[-1]}

        return router

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def _ready() -> dict[str, str]:
    return {"database": "ok"}


async def test_bodies_are_capped_per_path_prefix_before_any_route_reads_them() -> None:
    console = Console()
    app = create_app(channels=[console], ready=_ready)
    cap = BODY_CAPS["/console"]
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.post("/console/import", content=b"x" * cap)).status_code == 200
        declared = await client.post("/console/import", content=b"x" * (cap + 1))
        assert declared.status_code == 413

        async def chunked(size: int):  # no Content-Length: counted as it arrives
            for _ in range(size // KIB):
                yield b"x" * KIB

        streamed = await client.post("/console/import", content=chunked(cap + KIB))
        assert streamed.status_code == 413
        # any other path: the default cap
        too_big = await client.post("/elsewhere", content=b"x" * (DEFAULT_BODY_CAP + 1))
        assert too_big.status_code == 413
    assert console.read == [cap]  # the refused bodies never reached the route


async def test_web_chat_body_cap_and_token_come_before_parsing(db_url: str,
                                                               model_dir: Path) -> None:
    services = await build_services(settings_for(db_url, model_dir, webchat_token=TOKEN),
                                    backend=ScriptedBackend())
    async with serve_app(build_app(services, webchat=True)) as url, \
            httpx.AsyncClient(base_url=url) as client:
        garbage = b"{not json"
        assert (await client.post("/api/chat", content=garbage)).status_code == 401
        headers = {"Content-Type": "application/json"}
        assert (await client.post("/api/vote", content=garbage, headers=headers)).status_code \
            == 401
        assert (await client.post("/api/chat", content=garbage, headers=AUTH)).status_code \
            == 422
        huge = json.dumps({"event_id": "e", "chat_id": "c", "text": "x" * BODY_CAPS["/api/"]})
        assert (await client.post("/api/chat", content=huge, headers=AUTH)).status_code == 413
        nested = b'{"event_id": "e", "chat_id": "c", "text": ' + b"[" * 100_000 + b"]" * 100_000 \
            + b"}"
        assert (await client.post("/api/chat", content=nested, headers=AUTH)).status_code == 422


async def test_nul_characters_are_cleaned_and_lone_surrogates_refused(db_url: str,
                                                                      model_dir: Path) -> None:
    """PostgreSQL refuses NUL in text: the question is stored without it and answered."""
    services = await build_services(settings_for(db_url, model_dir), backend=ScriptedBackend())
    async with serve_app(build_app(services, webchat=True)) as url, \
            httpx.AsyncClient(base_url=url, timeout=30) as client:
        body = {"event_id": "e\u0000 1", "chat_id": "tab\u00001", "text": "hi\u0000 there"}
        async with client.stream("POST", "/api/chat", json=body) as r:
            assert r.status_code == 200
            events = [json.loads(line) async for line in r.aiter_lines() if line]
        assert events[-1]["type"] == "done" and events[-1]["text"] == "Echo: hi there"
        lone = '{"event_id": "e2", "chat_id": "c", "text": "a \\ud800 b"}'
        r = await client.post("/api/chat", content=lone,
                              headers={"Content-Type": "application/json"})
        assert r.status_code == 422
    async with services.sessions() as s:
        texts = (await s.execute(select(Message.text).order_by(Message.id))).scalars().all()
    assert texts == ["hi there", "Echo: hi there"]


async def test_readiness_is_probed_at_most_once_per_few_seconds_and_says_little() -> None:
    calls: list[int] = []

    async def ready() -> dict[str, str]:
        calls.append(1)
        return {"database": "ok", "inference": "unavailable"}

    app = create_app(channels=[], ready=ready, ready_cache_s=60)
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:
        for _ in range(20):
            r = await client.get("/readyz")
            assert r.status_code == 503
        assert r.json() == {"ready": False, "database": "ok", "inference": "unavailable"}
        assert len(calls) == 1
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert (await client.get(path)).status_code == 404


async def test_readiness_reasons_name_no_internals(model_dir: Path, tmp_path: Path) -> None:
    class Down(ScriptedBackend):
        async def health(self) -> None:
            from inference.errors import BackendUnavailable

            raise BackendUnavailable("connect to http://10.0.0.7:8001/v1 failed: secret detail")

    db = f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"
    from storage.migrate import upgrade_async

    await upgrade_async(db)
    services = await build_services(settings_for(db, model_dir), backend=Down())
    async with serve_app(build_app(services, webchat=False)) as url, \
            httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {"ready": False, "database": "ok", "inference": "unavailable"}


async def test_the_token_never_travels_in_the_query_string(db_url: str, model_dir: Path) -> None:
    services = await build_services(settings_for(db_url, model_dir, webchat_token=TOKEN),
                                    backend=ScriptedBackend())
    async with serve_app(build_app(services, webchat=True)) as url, \
            httpx.AsyncClient(base_url=url) as client:
        refused = await client.get("/chat", params={"token": TOKEN})
        assert refused.status_code == 400 and TOKEN not in refused.text
        assert (await client.get("/chat")).status_code == 200
    page = PAGE.read_text()
    assert "location.search" not in page  # the page reads the fragment, or asks
    assert "location.hash" in page and "prompt(" in page
    assert "history.replaceState" in page  # and takes it out of the address bar


def test_the_web_chat_page_shows_model_text_as_text() -> None:
    """The page writes answers with textContent, never as HTML: links, pings and markup in
    model output stay text."""
    page = PAGE.read_text()
    assert "textContent = ev.text" in page
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
        assert sink not in page
