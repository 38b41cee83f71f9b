"""Identities across channels, black box: one gateway with the web chat and Telegram (the fake
Bot API), CHATLOOP_REVIEWERS='["telegram:111"]'."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from chatloop.app import Services, build_app, build_services
from chatloop.settings import Settings
from storage.models import Feedback, Message
from tests.fakes.inference import ScriptedBackend
from tests.fakes.servers import serve_app
from tests.fakes.telegram_api import TOKEN, FakeTelegram

REVIEWER = 111


@dataclass
class Gateway:
    web: httpx.AsyncClient  # one browser (it keeps its cookie)
    url: str
    telegram: FakeTelegram
    services: Services

    async def feedback(self) -> list[Feedback]:
        async with self.services.sessions() as s:
            return list((await s.execute(select(Feedback).order_by(Feedback.id))).scalars())


@pytest.fixture
async def gateway(db_url: str, model_dir: Path,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    monkeypatch.setenv("CHATLOOP_REVIEWERS", json.dumps([f"telegram:{REVIEWER}"]))
    fake = FakeTelegram()
    async with serve_app(fake.app()) as tg_url:
        settings = Settings.from_env_names(
            database_url=db_url, model=str(model_dir), max_tokens=48,
            webchat_secret="s" * 32,
            telegram_bot_token=TOKEN, telegram_api_base=tg_url, telegram_poll_timeout_s=1,
            telegram_draft_interval_s=0.05, telegram_edit_interval_s=0.05)
        services = await build_services(settings, backend=ScriptedBackend())
        try:
            async with serve_app(build_app(services, webchat=True)) as url, \
                    httpx.AsyncClient(base_url=url, timeout=30) as web:
                yield Gateway(web, url, fake, services)
        finally:
            fake.release_pollers()


async def eventually(check: Callable[[], Any], within: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while not (found := check()):
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)
    return found


async def web_answer(web: httpx.AsyncClient, text: str = "When do you open?") -> int:
    body = {"event_id": f"ev-{text}", "chat_id": "tab", "text": text}
    async with web.stream("POST", "/api/chat", json=body) as r:
        assert r.status_code == 200
        events = [json.loads(line) async for line in r.aiter_lines() if line]
    assert events[-1]["type"] == "done"
    return int(events[-1]["answer_id"])


async def telegram_answer(gw: Gateway, user: int = REVIEWER) -> tuple[dict[str, Any], int]:
    chat = gw.telegram.private(user)
    gw.telegram.say(chat, "When do you open?")
    [answer] = await eventually(lambda: gw.telegram.answers(chat["id"]))
    up = answer["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
    return answer, int(up.split(":")[1])


async def test_only_the_telegram_reviewer_is_trusted_whatever_the_web_claims(
        gateway: Gateway) -> None:
    gw = gateway
    answer_id = await web_answer(gw.web)
    for claimed in (str(REVIEWER), f"telegram:{REVIEWER}"):  # the body's user is not read
        r = await gw.web.post("/api/correction", json={
            "answer_id": answer_id, "user_id": claimed, "text": f"We open at 9 ({claimed})."})
        assert r.status_code == 200
        assert (r.json()["trusted"], r.json()["review_status"]) == (False, "pending")
    [web_fb] = await gw.feedback()  # one person, the browser: the second replaced the first
    assert web_fb.voter_id == "web:" + gw.web.cookies["chatloop_id"].split(".")[0]
    assert (web_fb.trusted, web_fb.review_status) == (False, "pending")

    answer, tg_answer = await telegram_answer(gw)  # the reviewer, on Telegram
    chat = answer["chat"]
    gw.telegram.press(answer, f"v:{tg_answer}:d")
    prompt = await eventually(lambda: [m for m in gw.telegram.sent(chat["id"])
                                       if "better one" in m["text"]])
    gw.telegram.say(chat, "We open at eight.", reply_to=prompt[0])
    thanks = await eventually(lambda: [m for m in gw.telegram.sent(chat["id"])
                                       if m["text"].startswith("Thanks!")])
    assert "reviewer will check" not in thanks[0]["text"]
    tg_fb = (await gw.feedback())[-1]
    assert (tg_fb.answer_id, tg_fb.voter_id, tg_fb.correction, tg_fb.trusted,
            tg_fb.review_status) == (tg_answer, f"telegram:{REVIEWER}", "We open at eight.",
                                     True, "approved")


async def test_feedback_on_another_channels_answer_is_as_if_it_did_not_exist(
        gateway: Gateway) -> None:
    gw = gateway
    answer, tg_answer = await telegram_answer(gw, user=42)
    missing = await gw.web.post("/api/vote", json={"answer_id": 999_999, "rating": 1})
    for path, body in (("/api/vote", {"rating": 1}), ("/api/correction", {"text": "Nine."})):
        r = await gw.web.post(path, json={"answer_id": tg_answer, **body})
        assert r.status_code == 404
        assert r.json() == {"detail": f"no answer with id {tg_answer}"}  # no hint it exists
    assert missing.json() == {"detail": "no answer with id 999999"}

    web_answer_id = await web_answer(gw.web)  # and a Telegram button on a web answer
    gw.telegram.press(answer, f"v:{web_answer_id}:u")
    await eventually(lambda: gw.telegram.answered_callbacks)
    assert list(gw.telegram.answered_callbacks.values()) == ["That answer is no longer available."]
    assert await gw.feedback() == []
    async with gw.services.sessions() as s:
        authors = set((await s.execute(select(Message.author_id)
                                       .where(Message.role == "user"))).scalars())
    assert authors == {"telegram:42", "web:" + gw.web.cookies["chatloop_id"].split(".")[0]}
