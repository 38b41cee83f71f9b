"""The Slack channel with the real bundled model in the embedded engine (slow, runs in CI)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from bots.slack.render import safe_text
from chatloop.app import build_app, build_services
from storage.models import Message
from tests.fakes.inference import ScriptedBackend
from tests.fakes.servers import serve_app
from tests.fakes.slack_api import FakeSlack
from tests.slack.conftest import Gateway, payload, thread_of
from tests.slack.gateway_proc import slack_settings


@pytest.mark.slow
async def test_mention_is_answered_by_the_bundled_model(
        sqlite_url: str, model_dir: Path, fake_slack: FakeSlack) -> None:
    settings = slack_settings(sqlite_url, fake_slack.url, model=str(model_dir), max_tokens=24)
    services = await build_services(settings)
    async with serve_app(build_app(services, webchat=False)) as url, \
            httpx.AsyncClient(base_url=url, timeout=60) as http:
        gw = Gateway(http, fake_slack, services, ScriptedBackend())
        body = payload("app_mention", text="<@U0BOT> What is the capital of France?")
        assert (await gw.event(body)).status_code == 200
        [answer] = await gw.answered(*thread_of(body), within=120)
        async with services.sessions() as s:
            stored = (await s.execute(select(Message).where(Message.role == "assistant"))
                      ).scalar_one()
    assert stored.status == "ok" and stored.text.strip() and stored.completion_tokens
    assert stored.external_message_id == answer.ts
    assert answer.text == safe_text(stored.text)  # shown exactly, made safe for mrkdwn
