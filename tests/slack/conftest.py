"""Slack test harness: the fake Web API, the real gateway, requests signed as Slack signs them."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatloop.app import Services, build_app, build_services
from storage.migrate import upgrade_async
from tests.fakes.inference import ScriptedBackend
from tests.fakes.servers import serve_app
from tests.fakes.slack_api import FakeSlack
from tests.slack.gateway_proc import SECRET, scripted, slack_settings

PAYLOADS = Path(__file__).with_name("payloads")


def payload(name: str, **event: Any) -> dict[str, Any]:
    """A payload fixture (payloads/<name>.json) with `event` fields replaced."""
    body = json.loads((PAYLOADS / f"{name}.json").read_text())
    if event:
        body["event"].update(event)
    return body


def sign(body: bytes, *, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    """Slack's request signature (S1): v0=HMAC-SHA256(secret, "v0:{ts}:{raw body}")."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}"}


@dataclass
class Gateway:
    """The gateway with the Slack channel, as Slack (events, clicks) and users see it."""

    http: httpx.AsyncClient
    fake: FakeSlack
    services: Services
    backend: ScriptedBackend

    async def event(self, body: dict[str, Any], *, retry: int | None = None,
                    headers: dict[str, str] | None = None) -> httpx.Response:
        raw = json.dumps(body).encode()
        h = {"Content-Type": "application/json", **sign(raw), **(headers or {})}
        if retry is not None:
            h |= {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
        return await self.http.post("/slack/events", content=raw, headers=h)

    async def interact(self, body: dict[str, Any]) -> httpx.Response:
        raw = urllib.parse.urlencode({"payload": json.dumps(body)}).encode()
        h = {"Content-Type": "application/x-www-form-urlencoded", **sign(raw)}
        return await self.http.post("/slack/events", content=raw, headers=h)

    async def idle(self) -> None:
        """Wait until the channel has no answer, notice or edit in progress."""
        await self.services.channels["slack"].idle()  # type: ignore[attr-defined]

    async def answered(self, channel: str, thread_ts: str, count: int = 1,
                       within: float = 10.0) -> list[Any]:
        """Wait until `count` answers (messages with feedback buttons) are in the thread."""
        done = await self.fake.wait_for(
            lambda: len(found := [m for m in self.fake.thread(channel, thread_ts)
                                  if m.feedback]) >= count and found, within)
        await self.idle()
        return done


Launch = Callable[..., AbstractAsyncContextManager[Gateway]]


@pytest.fixture
async def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'slack.db'}"
    await upgrade_async(url)
    return url


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    async with FakeSlack().serve() as fake:
        yield fake


@pytest.fixture
def launch(fake_slack: FakeSlack) -> Launch:
    """`async with launch(db_url, backend, **settings) as gw:` a served gateway."""

    @asynccontextmanager
    async def run(db_url: str, backend: ScriptedBackend | None = None,
                  **settings: Any) -> AsyncIterator[Gateway]:
        backend = backend or scripted()
        services = await build_services(slack_settings(db_url, fake_slack.url, **settings),
                                        backend=backend)
        async with serve_app(build_app(services, webchat=False)) as url, \
                httpx.AsyncClient(base_url=url, timeout=30) as http:
            yield Gateway(http, fake_slack, services, backend)

    return run


@pytest.fixture
async def gw(launch: Launch, sqlite_url: str) -> AsyncIterator[Gateway]:
    async with launch(sqlite_url) as gateway:
        yield gateway


def thread_of(body: dict[str, Any]) -> tuple[str, str]:
    event = body["event"]
    return event["channel"], event.get("thread_ts") or event["ts"]


def clone(body: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(body)
