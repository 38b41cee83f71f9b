"""Telegram channel (aiogram 3): long polling or webhook, streamed answers, 👍 / 👎, corrections.

`build_channel(settings.telegram, core=...)` is called by the composition root when
TELEGRAM_BOT_TOKEN is set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer

from bots.telegram.channel import TelegramChannel, TelegramOptions
from bots.telegram.metrics import CountCalls
from bots.telegram.outbound import HoldResponseTypes

if TYPE_CHECKING:
    from bots.core import ConversationCore
    from chatloop.settings import TelegramSettings

__all__ = ["TelegramChannel", "TelegramOptions", "build_channel", "make_bot"]


def make_bot(token: str, *, api_base: str | None = None, timeout_s: float = 30.0) -> Bot:
    """An aiogram Bot; `api_base` points it at another Bot API server (self-hosted, or a fake).

    `timeout_s` bounds each call (long polls get their poll timeout on top), so a hung
    connection becomes a retried network error instead of a stuck conversation.
    """
    session = AiohttpSession(timeout=timeout_s)
    session.middleware(HoldResponseTypes())
    session.middleware(CountCalls())  # chatloop_platform_api_calls_total
    if api_base:
        session.api = TelegramAPIServer.from_base(api_base)
    return Bot(token, session=session)


def build_channel(settings: TelegramSettings, *, core: ConversationCore) -> TelegramChannel:
    """The Telegram channel on `core`, as `settings` (its section) configure it."""
    s = settings
    assert s.bot_token is not None
    secret = s.webhook_secret.get_secret_value() if s.webhook_secret else None
    options = TelegramOptions(
        mode=s.mode, webhook_url=s.webhook_url, webhook_secret=secret,
        draft_interval_s=s.draft_interval_s, edit_interval_s=s.edit_interval_s,
        sends_per_s=s.sends_per_s,
        poll_timeout_s=s.poll_timeout_s, drain_s=s.drain_s, agents_chat=s.agents_chat,
    )
    bot = make_bot(s.bot_token.get_secret_value(), api_base=s.api_base)
    return TelegramChannel(core=core, bot=bot, options=options)
