"""Telegram channel (aiogram 3): long polling or webhook, streamed answers, 👍 / 👎, corrections.

`build_channel(services)` is called by the composition root when TELEGRAM_BOT_TOKEN is set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer

from bots.telegram.channel import TelegramChannel, TelegramOptions
from bots.telegram.outbound import HoldResponseTypes

if TYPE_CHECKING:
    from chatloop.app import Services

__all__ = ["TelegramChannel", "TelegramOptions", "build_channel", "make_bot"]


def make_bot(token: str, *, api_base: str | None = None, timeout_s: float = 30.0) -> Bot:
    """An aiogram Bot; `api_base` points it at another Bot API server (self-hosted, or a fake).

    `timeout_s` bounds each call (long polls get their poll timeout on top), so a hung
    connection becomes a retried network error instead of a stuck conversation.
    """
    session = AiohttpSession(timeout=timeout_s)
    session.middleware(HoldResponseTypes())
    if api_base:
        session.api = TelegramAPIServer.from_base(api_base)
    return Bot(token, session=session)


def build_channel(services: Services) -> TelegramChannel:
    s = services.settings
    assert s.telegram_bot_token is not None
    secret = s.telegram_webhook_secret.get_secret_value() if s.telegram_webhook_secret else None
    options = TelegramOptions(
        mode=s.telegram_mode, webhook_url=s.telegram_webhook_url, webhook_secret=secret,
        draft_interval_s=s.telegram_draft_interval_s, edit_interval_s=s.telegram_edit_interval_s,
        poll_timeout_s=s.telegram_poll_timeout_s, drain_s=s.telegram_drain_s,
    )
    bot = make_bot(s.telegram_bot_token.get_secret_value(), api_base=s.telegram_api_base)
    return TelegramChannel(core=services.core, bot=bot, options=options)
