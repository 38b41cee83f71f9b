"""Hostile input and output on Telegram: bodies capped, nesting and odd text never a 500,
and model output rendered so that nothing it writes becomes a link or markup."""

from __future__ import annotations

import json

import httpx
from sqlalchemy import select

from bots.telegram.render import to_html
from storage.models import Message
from tests.telegram.conftest import eventually
from tests.telegram.test_webhook import SECRET, gateway

HEADERS = {"X-Telegram-Bot-Api-Secret-Token": SECRET, "Content-Type": "application/json"}


async def test_nul_and_lone_surrogates_are_stored_cleaned_and_answered(  # type: ignore[no-untyped-def]
        fake, db_url, model_dir) -> None:
    async with gateway(fake, db_url, model_dir) as (url, services, _backend):
        chat = fake.private()
        update = {"update_id": 901, "message": {
            "message_id": 1, "date": 1735689600, "chat": chat, "from": fake.user(chat["id"]),
            "text": "hi\u0000 there \ud800!"}}  # JSON escapes both: \\u0000, \\ud800
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.post("/telegram/webhook", content=json.dumps(update),
                                  headers=HEADERS)
        assert r.status_code == 200
        [answer] = await eventually(lambda: fake.answers(chat["id"]))
        assert answer["text"] == "Echo: hi there \ufffd!"
        async with services.sessions() as s:
            texts = (await s.execute(select(Message.text).order_by(Message.id))).scalars().all()
    assert texts == ["hi there \ufffd!", "Echo: hi there \ufffd!"]


async def test_nested_or_oversized_updates_get_4xx(fake, db_url, model_dir) -> None:  # type: ignore[no-untyped-def]
    async with gateway(fake, db_url, model_dir) as (url, _, backend):
        async with httpx.AsyncClient(base_url=url) as client:
            nested = b'{"update_id": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            r = await client.post("/telegram/webhook", content=nested, headers=HEADERS)
            assert r.status_code == 400
            big = json.dumps({"update_id": 2, "pad": "x" * (1024 * 1024)})
            r = await client.post("/telegram/webhook", content=big, headers=HEADERS)
            assert r.status_code == 413
        assert backend.requests == []


def test_model_output_renders_no_link_or_markup() -> None:
    evil = ("[the docs](https://evil.example) <a href=\"https://evil.example\">x</a> "
            "<tg-spoiler>s</tg-spoiler> tg://user?id=1 **bold** `code`")
    html = to_html(evil)
    assert "<a " not in html and "<tg-" not in html  # escaped: shown, not acted on
    assert "[the docs](https://evil.example)" in html  # Markdown links stay text
    assert html.count("<") == html.count("</") * 2  # only our own <b> and <code> pairs
