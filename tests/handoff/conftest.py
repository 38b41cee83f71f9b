"""Hand-off fixtures: the Telegram channel with an agents' forum group, on the fake Bot API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import select

from bots.core import ConversationCore, CoreLimits
from bots.core.handoff import HandoffPolicy
from bots.telegram import TelegramChannel, TelegramOptions, make_bot
from bots.telegram.outbound import RetryPolicy
from inference.prompt import PromptFitter
from tests.fakes.inference import ScriptedBackend
from tests.fakes.telegram_api import TOKEN, FakeTelegram
from tests.slack.conftest import fake_slack, launch, sqlite_url  # noqa: F401 - fixtures
from tests.telegram.conftest import FAST, Bot, fake, tokenizer  # noqa: F401 - fixtures

AGENTS = -1009000000001
AGENT = {"id": 77, "is_bot": False, "first_name": "Maya"}
REVIEWERS = frozenset({"telegram:77"})


def handoff_core(sessions: Any, tokenizer: Any, backend: ScriptedBackend,  # noqa: F811
                 **policy: Any) -> ConversationCore:
    return ConversationCore(
        sessions=sessions, backend=backend,
        fitter=PromptFitter(tokenizer, context_tokens=2048, max_tokens=128),
        system_prompt="Be brief.", limits=CoreLimits(max_tokens=128), reviewers=REVIEWERS,
        handoff=HandoffPolicy(channels=frozenset({"telegram", "slack"}), **policy))


@pytest.fixture
async def start_desk(fake: FakeTelegram, sessions: Any, tokenizer: Any  # noqa: F811
                     ) -> AsyncIterator[Callable[..., Awaitable[Bot]]]:
    """`await start_desk(**policy)`: a Telegram channel whose agents work in a forum group."""
    started: list[TelegramChannel] = []

    async def start(backend: ScriptedBackend | None = None, **policy: Any) -> Bot:
        backend = backend or ScriptedBackend(answer=lambda r: "Our hours are nine to five.")
        core = handoff_core(sessions, tokenizer, backend, **policy)
        channel = TelegramChannel(
            core=core, bot=make_bot(TOKEN, api_base=fake.base_url),  # type: ignore[attr-defined]
            options=TelegramOptions(**{**FAST, "agents_chat": AGENTS, "handoff_sweep_s": 0.1}),
            retry=RetryPolicy(backoff_s=0.05, max_backoff_s=0.2))
        await channel.start()
        started.append(channel)
        return Bot(fake, channel, core, backend, sessions)

    fake.group(AGENTS, forum=True)
    yield start
    for channel in started:
        await channel.stop()


async def rows(sessions: Any, model: Any) -> list[Any]:
    async with sessions() as s:
        stmt = select(model).order_by(model.id).execution_options(populate_existing=True)
        return list((await s.execute(stmt)).scalars())


async def settled(sessions: Any, model: Any, check: Any, within: float = 10.0) -> list[Any]:
    """The rows of `model` once `check(rows)` holds (writes follow what the fakes show)."""
    deadline = asyncio.get_running_loop().time() + within
    while not check(found := await rows(sessions, model)):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{model.__name__} rows never settled: {found}")
        await asyncio.sleep(0.02)
    return found


__all__ = ["AGENT", "AGENTS", "handoff_core", "rows", "settled"]
