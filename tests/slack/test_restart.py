"""A gateway killed after acknowledging an event: the restarted one answers it, once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
from sqlalchemy import select

from storage.models import InboundEvent, Message
from tests.fakes.slack_api import FakeSlack
from tests.slack import gateway_proc
from tests.slack.conftest import Launch, payload, sign, thread_of

ROOT = Path(__file__).resolve().parents[2]


async def test_event_acknowledged_then_killed_is_answered_after_restart_once(
        launch: Launch, db_url: str, fake_slack: FakeSlack) -> None:
    body = payload("app_mention")
    raw = json.dumps(body).encode()
    proc, url = await gateway_proc.start(db_url, fake_slack.url, "--seconds", "60")
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.post("/slack/events", content=raw,
                                headers={"Content-Type": "application/json", **sign(raw)})
        assert r.status_code == 200
        await fake_slack.wait_for(lambda: fake_slack.count("chat.startStream"))
    finally:
        proc.kill()  # SIGKILL: no shutdown handlers run, as in a crash
        await proc.wait()
    async with launch(db_url) as gw:  # start-up resumes the unfinished event
        [answer] = await gw.answered(*thread_of(body))
        assert answer.text == "Echo: summarize this"
        assert (await gw.event(body, retry=1)).status_code == 200  # Slack's late retry
        await asyncio.sleep(0.3)
        await gw.idle()
        assert len([m for m in fake_slack.thread(*thread_of(body)) if m.feedback]) == 1
        assert len(gw.backend.requests) == 1
        async with gw.services.sessions() as s:
            roles = (await s.execute(select(Message.role).order_by(Message.id))).scalars().all()
            event = (await s.execute(select(InboundEvent))).scalar_one()
        assert roles == ["user", "assistant"] and event.status == "done"
