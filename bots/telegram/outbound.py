"""Calls to the Bot API through aiogram: errors mapped in one place, bounded retries.

aiogram raises `TelegramRetryAfter` on 429 and never retries itself; here a 429 is honoured
(sleep `retry_after`, then again), network and 5xx errors are retried with backoff, and the
rest become the typed errors below, so callers never look at description strings.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aiogram import Bot
from aiogram.client.session.middlewares.base import (
    BaseRequestMiddleware,
    NextRequestMiddlewareType,
)
from aiogram.exceptions import (
    ClientDecodeError,
    TelegramAPIError,
    TelegramBadRequest,
    TelegramEntityTooLarge,
    TelegramForbiddenError,
    TelegramMigrateToChat,
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
)
from aiogram.methods import Response, TelegramMethod
from aiogram.types import InlineKeyboardMarkup, LinkPreviewOptions, ReplyParameters

from bots.telegram.render import is_plain, to_html

log = logging.getLogger(__name__)
T = TypeVar("T")
NO_PREVIEW = LinkPreviewOptions(is_disabled=True)  # model output must not unfurl links


class DeliveryError(Exception):
    """A Bot API call failed for good (after any retries)."""


class ChatUnreachable(DeliveryError):
    """The bot was blocked or kicked, or the chat does not exist: retrying cannot help."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        text = message.lower()
        self.kind = next((k for k in ("blocked", "kicked", "deactivated") if k in text),
                         "chat_not_found" if "chat not found" in text else "forbidden")


class FloodWait(DeliveryError):
    """Telegram's flood control outlasted our retries (or there were none)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"flood control: retry after {retry_after}s")
        self.retry_after = retry_after


class NotModified(DeliveryError):
    """An edit that would change nothing; callers treat it as done."""


class MessageMissing(DeliveryError):
    """The message to edit is gone (deleted by a user)."""


class ChatMigrated(DeliveryError):
    """The group became a supergroup: the chat now has another id."""

    def __init__(self, message: str, new_chat_id: int) -> None:
        super().__init__(message)
        self.new_chat_id = new_chat_id


class Unparseable(DeliveryError):
    """Telegram rejected the formatting (`can't parse entities`)."""


class TopicGone(DeliveryError):
    """The forum topic was deleted (`message thread not found`) or closed (`TOPIC_CLOSED`)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.kind = "topic_closed" if "topic_closed" in message.lower() else "topic_deleted"


def translate(exc: TelegramAPIError) -> DeliveryError:
    """The one place where Bot API error descriptions are read."""
    text = exc.message.lower()
    if isinstance(exc, TelegramMigrateToChat):
        return ChatMigrated(exc.message, exc.migrate_to_chat_id)
    if isinstance(exc, TelegramForbiddenError) or "chat not found" in text:
        return ChatUnreachable(exc.message)
    if isinstance(exc, TelegramBadRequest):
        if "message is not modified" in text:
            return NotModified(exc.message)
        if "message to edit not found" in text:
            return MessageMissing(exc.message)
        if "can't parse entities" in text or "can't find end" in text:
            return Unparseable(exc.message)
        if "message thread not found" in text or "topic_closed" in text \
                or "topic_deleted" in text:
            return TopicGone(exc.message)
    return DeliveryError(f"{type(exc).__name__}: {exc.message}")


class HoldResponseTypes(BaseRequestMiddleware):
    """Keeps the `Response[T]` type aiogram builds for each call alive.

    aiogram parametrizes the pydantic model `Response[T]` on every call; pydantic caches that
    class only weakly, so after each garbage collection the next call builds it again (1-4 ms
    of CPU, measured: about 5% of a busy gateway's time). Holding one per method stops that.
    """

    def __init__(self) -> None:
        self._held: dict[type, type] = {}

    async def __call__(self, make_request: NextRequestMiddlewareType[T], bot: Bot,
                       method: TelegramMethod[T]) -> Response[T]:
        if type(method) not in self._held:
            self._held[type(method)] = Response[method.__returning__]  # type: ignore[name-defined]
        return await make_request(bot, method)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 120.0  # a longer flood wait is not worth holding a reply for


async def call(op: Callable[[], Awaitable[T]], policy: RetryPolicy) -> T:
    """Run one Bot API call with `policy`; raises a DeliveryError subclass when it gives up."""
    for attempt in range(1, policy.attempts + 1):
        last = attempt == policy.attempts
        try:
            return await op()
        except TelegramRetryAfter as exc:
            if last or exc.retry_after > policy.max_retry_after_s:
                raise FloodWait(exc.retry_after) from exc
            log.info("telegram flood control: waiting %ss", exc.retry_after)
            await asyncio.sleep(exc.retry_after)
        except TelegramEntityTooLarge as exc:  # a subclass of the network error: never retried
            raise translate(exc) from exc
        except (TelegramNetworkError, TelegramServerError, ClientDecodeError) as exc:
            if last:  # ClientDecodeError: not JSON, e.g. a proxy's error page
                raise DeliveryError(f"gave up after {attempt} attempts: {exc}") from exc
            delay = min(policy.max_backoff_s, policy.backoff_s * 2 ** (attempt - 1))
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        except TelegramAPIError as exc:
            raise translate(exc) from exc
    raise AssertionError("unreachable")


@dataclass(frozen=True, slots=True)
class Target:
    """Where a reply goes: a chat, maybe a forum topic, maybe quoting the question."""

    chat_id: int
    thread_id: int | None = None
    reply_to: int | None = None

    @property
    def private(self) -> bool:
        return self.chat_id > 0  # Telegram: users are positive ids, groups negative


class TelegramApi:
    """The outbound calls the channel makes; wraps (never extends) an aiogram Bot."""

    def __init__(self, bot: Bot, policy: RetryPolicy | None = None) -> None:
        self.bot = bot
        self.policy = policy or RetryPolicy()
        self._moved: dict[int, int] = {}  # groups upgraded to supergroups: old id -> new id
        # awaited before every message, edit and draft (each attempt): the bot's send budget
        self.budget: Callable[[], Awaitable[None]] | None = None

    def _budgeted(self, op: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
        async def run() -> T:
            if self.budget is not None:
                await self.budget()
            return await op()
        return run

    async def put(self, where: Target, text: str, *, keyboard: InlineKeyboardMarkup | None = None,
                  edit: int | None = None, formatted: bool = True, quote: bool = False,
                  patient: bool = True) -> int:
        """Send (or edit into `edit`) one message and return its id.

        Formatting Telegram rejects falls back to the plain text and a vanished message to a
        new one, so the text always arrives. `patient=False` makes a single attempt (streaming:
        the next update carries newer text anyway).
        """
        policy = self.policy if patient else _ONCE
        if formatted and not is_plain(text):
            try:
                return await self._put(where, to_html(text), "HTML", keyboard, edit, quote, policy)
            except Unparseable as exc:
                log.warning("telegram rejected the HTML (%s): sending plain text", exc)
        return await self._put(where, text, None, keyboard, edit, quote, policy)

    async def _put(self, where: Target, text: str, parse_mode: str | None,
                   keyboard: InlineKeyboardMarkup | None, edit: int | None, quote: bool,
                   policy: RetryPolicy) -> int:
        where = self._current(where)
        try:
            return await self._put_in(where, text, parse_mode, keyboard, edit, quote, policy)
        except ChatMigrated as exc:
            # a group upgraded to a supergroup: its messages so far stay behind in the old chat
            log.info("chat %s is now supergroup %s: sending there", where.chat_id,
                     exc.new_chat_id)
            self._moved[where.chat_id] = exc.new_chat_id
            return await self._put_in(self._current(where), text, parse_mode, keyboard, None,
                                      False, policy)

    def _current(self, where: Target) -> Target:
        new_id = self._moved.get(where.chat_id)
        return where if new_id is None else Target(new_id, where.thread_id)

    async def _put_in(self, where: Target, text: str, parse_mode: str | None,
                      keyboard: InlineKeyboardMarkup | None, edit: int | None, quote: bool,
                      policy: RetryPolicy) -> int:
        if edit is not None:
            try:
                await call(self._budgeted(lambda: self.bot.edit_message_text(
                    text=text, chat_id=where.chat_id, message_id=edit, parse_mode=parse_mode,
                    reply_markup=keyboard, link_preview_options=NO_PREVIEW)), policy)
                return edit
            except NotModified:
                return edit
            except MessageMissing:
                log.info("message %s in chat %s is gone: sending anew", edit, where.chat_id)
        reply = (ReplyParameters(message_id=where.reply_to, allow_sending_without_reply=True)
                 if quote and where.reply_to is not None else None)
        sent = await call(self._budgeted(lambda: self.bot.send_message(
            chat_id=where.chat_id, text=text, message_thread_id=where.thread_id,
            parse_mode=parse_mode, reply_markup=keyboard, reply_parameters=reply,
            link_preview_options=NO_PREVIEW)), policy)
        return sent.message_id

    async def draft(self, where: Target, draft_id: int, text: str) -> None:
        """One streaming preview in a private chat (sendMessageDraft); a single attempt."""
        where = self._current(where)
        await call(self._budgeted(lambda: self.bot.send_message_draft(
            chat_id=where.chat_id, draft_id=draft_id, text=text,
            message_thread_id=where.thread_id, parse_mode=None)), _ONCE)

    async def send_plain(self, where: Target, text: str, *, quote: bool) -> int:
        return await self._put(where, text, None, None, None, quote, self.policy)

    async def send_html(self, where: Target, html: str, *, quote: bool) -> int:
        """Send HTML the bot wrote itself (never model output: that goes through `put`)."""
        return await self._put(where, html, "HTML", None, None, quote, self.policy)

    async def typing(self, where: Target) -> None:
        where = self._current(where)
        await call(lambda: self.bot.send_chat_action(
            chat_id=where.chat_id, action="typing", message_thread_id=where.thread_id), _ONCE)

    async def answer_callback(self, query_id: str, text: str | None = None) -> None:
        await call(lambda: self.bot.answer_callback_query(query_id, text=text),
                   RetryPolicy(attempts=3, max_retry_after_s=5))


_ONCE = RetryPolicy(attempts=1)
