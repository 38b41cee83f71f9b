"""Fixtures: the fake Bot API on loopback and a started Telegram channel with a scripted model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from transformers import AutoTokenizer

from bots.core import ConversationCore, CoreLimits
from bots.telegram import TelegramChannel, TelegramOptions, make_bot
from bots.telegram.outbound import RetryPolicy
from inference.prompt import PromptFitter
from storage.models import Message
from tests.fakes.inference import ScriptedBackend
from tests.fakes.servers import serve_app
from tests.fakes.telegram_api import TOKEN, FakeTelegram

FAST = dict(draft_interval_s=0.05, edit_interval_s=0.05, preview_after_s=0.0, poll_timeout_s=1,
            settle_s=0.05, drain_s=2.0)


@pytest.fixture(scope="session")
def tokenizer(model_dir):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    tg = FakeTelegram()
    async with serve_app(tg.app()) as url:
        tg.base_url = url  # type: ignore[attr-defined]
        yield tg
        tg.release_pollers()


@dataclass
class Bot:
    """A started channel plus what a test wants to look at."""

    fake: FakeTelegram
    channel: TelegramChannel
    core: ConversationCore
    backend: ScriptedBackend
    sessions: async_sessionmaker[Any]


async def eventually(check: Callable[[], Any], within: float = 10.0) -> Any:
    """Poll `check` until it returns something truthy (and return that)."""
    deadline = asyncio.get_running_loop().time() + within
    while not (result := check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {check}")
        await asyncio.sleep(0.02)
    return result


async def delivered_answer(session: Any) -> Message:
    """The one stored answer, once its delivery is recorded (after the final message is sent)."""
    for _ in range(500):
        answer = (await session.execute(select(Message).where(Message.role == "assistant")
                                        .execution_options(populate_existing=True))
                  ).scalar_one_or_none()
        if answer is not None and answer.external_message_id is not None:
            return answer
        await asyncio.sleep(0.02)
    raise AssertionError("the answer never got its message id")


def make_core(sessions: Any, tokenizer: Any, backend: ScriptedBackend, *,
              reviewers: frozenset[str] = frozenset(), **limits: Any) -> ConversationCore:
    return ConversationCore(
        sessions=sessions, backend=backend,
        fitter=PromptFitter(tokenizer, context_tokens=2048, max_tokens=128),
        system_prompt="Be brief.", limits=CoreLimits(max_tokens=128, **limits),
        reviewers=reviewers,
    )


@pytest.fixture
async def start_bot(fake: FakeTelegram, sessions: Any, tokenizer: Any
                    ) -> AsyncIterator[Callable[..., Awaitable[Bot]]]:
    started: list[TelegramChannel] = []

    async def start(backend: ScriptedBackend | None = None, *,
                    reviewers: frozenset[str] = frozenset(),
                    limits: dict[str, Any] | None = None, timeout_s: float = 30.0,
                    **options: Any) -> Bot:
        backend = backend or ScriptedBackend()
        core = make_core(sessions, tokenizer, backend, reviewers=reviewers, **(limits or {}))
        channel = TelegramChannel(
            core=core,
            bot=make_bot(TOKEN, api_base=fake.base_url, timeout_s=timeout_s),  # type: ignore[attr-defined]
            options=TelegramOptions(**{**FAST, **options}),
            retry=RetryPolicy(backoff_s=0.05, max_backoff_s=0.2),
        )
        await channel.start()
        started.append(channel)
        return Bot(fake, channel, core, backend, sessions)

    yield start
    for channel in started:
        await channel.stop()
