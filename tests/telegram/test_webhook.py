"""Webhook mode through the real gateway app: Telegram POSTs updates with the secret header."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import func, select

from bots.telegram import TelegramChannel, TelegramOptions, make_bot
from chatloop.app import build_app, build_services
from chatloop.settings import Settings
from storage.models import InboundEvent
from tests.fakes.inference import ScriptedBackend
from tests.fakes.telegram_api import TOKEN, FakeTelegram
from tests.fakes.vllm_server import free_port
from tests.telegram.conftest import eventually

SECRET = "s3cret-Token_1"


@asynccontextmanager
async def gateway(fake: FakeTelegram, db_url: str, model_dir: Path
                  ) -> AsyncIterator[tuple[str, Any, ScriptedBackend]]:
    """The gateway in webhook mode on a known port (setWebhook needs the URL at start-up)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = Settings(
        storage={"database_url": db_url}, inference={"model": str(model_dir)},
        telegram={"bot_token": TOKEN, "mode": "webhook",
                  "webhook_url": f"{url}/telegram/webhook", "webhook_secret": SECRET,
                  "api_base": fake.base_url,  # type: ignore[attr-defined]
                  "draft_interval_s": 0.05, "edit_interval_s": 0.05},
    )
    backend = ScriptedBackend()
    services = await build_services(settings, backend=backend)
    server = uvicorn.Server(uvicorn.Config(build_app(services, webchat=False), host="127.0.0.1",
                                           port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started or task.done())
    try:
        yield url, services, backend
    finally:
        server.should_exit = True
        await task


async def test_webhook_updates_are_answered_and_acknowledged(fake, db_url, model_dir) -> None:  # type: ignore[no-untyped-def]
    async with gateway(fake, db_url, model_dir) as (url, _, backend):
        assert fake.webhook == {"url": f"{url}/telegram/webhook", "secret": SECRET,
                                "max_connections": 40}
        chat = fake.private()
        fake.say(chat, "hello over the webhook")
        [answer] = await eventually(lambda: fake.answers(chat["id"]))
        assert answer["text"] == "Echo: hello over the webhook"
        group = fake.group()
        fake.mention(group, "and in a group")
        await eventually(lambda: fake.answers(group["id"]))
        assert fake.webhook_statuses == [200, 200]
        assert not fake.calls_to("getUpdates")
        assert len(backend.requests) == 2


async def test_wrong_or_missing_secret_is_401_and_nothing_is_processed(fake, db_url,  # type: ignore[no-untyped-def]
                                                                       model_dir) -> None:
    async with gateway(fake, db_url, model_dir) as (url, services, backend):
        chat = fake.private()
        update = {"update_id": 555, "message": {
            "message_id": 1, "date": 1735689600, "chat": chat,
            "from": fake.user(chat["id"]), "text": "let me in"}}
        async with httpx.AsyncClient(base_url=url) as client:
            for headers in ({"X-Telegram-Bot-Api-Secret-Token": "wrong"}, {}):
                r = await client.post("/telegram/webhook", json=update, headers=headers)
                assert r.status_code == 401
            await asyncio.sleep(0.2)
            async with services.sessions() as s:
                events = (await s.execute(select(func.count()).select_from(InboundEvent))).scalar()
            assert events == 0 and not backend.requests and not fake.calls_to("sendMessage")
            ok = await client.post("/telegram/webhook", json=update,
                                   headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
            assert ok.status_code == 200
        await eventually(lambda: fake.answers(chat["id"]))


async def test_a_webhook_update_delivered_twice_is_answered_once(fake, db_url, model_dir) -> None:  # type: ignore[no-untyped-def]
    async with gateway(fake, db_url, model_dir) as (url, _, backend):
        chat = fake.private()
        update = fake.say(chat, "only once please")
        await eventually(lambda: fake.answers(chat["id"]))
        headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
        async with httpx.AsyncClient(base_url=url) as client:
            again = await asyncio.gather(*(client.post("/telegram/webhook", json=update,
                                                       headers=headers) for _ in range(3)))
        assert [r.status_code for r in again] == [200, 200, 200]
        await asyncio.sleep(0.2)
        assert len(fake.answers(chat["id"])) == 1 and len(backend.requests) == 1


def test_webhook_mode_needs_a_url_and_a_valid_secret() -> None:
    bot = make_bot(TOKEN)
    for options in (TelegramOptions(mode="webhook", webhook_secret=SECRET),
                    TelegramOptions(mode="webhook", webhook_url="https://x/telegram/webhook"),
                    TelegramOptions(mode="webhook", webhook_url="https://x/telegram/webhook",
                                    webhook_secret="has spaces"),
                    TelegramOptions(mode="carrier-pigeon")):
        with pytest.raises(ValueError):
            TelegramChannel(core=None, bot=bot, options=options)  # type: ignore[arg-type]
