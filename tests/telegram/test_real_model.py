"""One private Q&A answered by the real bundled model (embedded engine) through Telegram."""

from __future__ import annotations

import dataclasses

import pytest

from bots.telegram import build_channel
from chatloop.app import build_services
from chatloop.settings import Settings
from tests.fakes.telegram_api import TOKEN
from tests.telegram.conftest import delivered_answer, eventually


@pytest.mark.slow
async def test_real_model_answer_streams_and_arrives_exactly(fake, db_url, model_dir) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(storage={"database_url": db_url},
                        inference={"model": str(model_dir)}, core={"max_tokens": 32},
                        telegram={"bot_token": TOKEN, "api_base": fake.base_url,
                                  "draft_interval_s": 0.05, "poll_timeout_s": 1})
    services = await build_services(settings)
    channel = build_channel(settings.telegram, core=services.core)
    # drafts from the first token: by default an answer done within 0.25 s is sent once, and a
    # short one from the bundled model can be
    channel.options = dataclasses.replace(channel.options, preview_after_s=0.0)
    await channel.start()
    try:
        chat = fake.private()
        fake.say(chat, "What is the capital of France?")
        [final] = await eventually(lambda: fake.answers(chat["id"]), within=120)
        async with services.sessions() as s:
            answer = await delivered_answer(s)
    finally:
        await channel.stop()
        await services.aclose()
    assert answer.status == "ok" and answer.completion_tokens
    assert final["text"] == answer.text.strip()
    assert fake.drafts and all(answer.text.strip().startswith(d["text"]) for d in fake.drafts)
