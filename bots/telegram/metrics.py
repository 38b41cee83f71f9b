"""Bot API calls counted by method and status (`chatloop_platform_api_calls_total`)."""

from __future__ import annotations

from typing import TypeVar

from aiogram import Bot
from aiogram.client.session.middlewares.base import (
    BaseRequestMiddleware,
    NextRequestMiddlewareType,
)
from aiogram.exceptions import (
    TelegramAPIError,
    TelegramBadRequest,
    TelegramConflictError,
    TelegramEntityTooLarge,
    TelegramForbiddenError,
    TelegramMigrateToChat,
    TelegramNetworkError,
    TelegramNotFound,
    TelegramRetryAfter,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from aiogram.methods import Response, TelegramMethod

from chatloop.telemetry.metrics import PLATFORM_CALLS
from chatloop.telemetry.tracing import STATE

T = TypeVar("T")
# aiogram's error per HTTP status (its session maps them in check_response); most specific first
_STATUS: tuple[tuple[type[TelegramAPIError], str], ...] = (
    (TelegramRetryAfter, "429"), (TelegramMigrateToChat, "400"), (TelegramEntityTooLarge, "413"),
    (TelegramNetworkError, "network"), (TelegramBadRequest, "400"),
    (TelegramUnauthorizedError, "401"), (TelegramForbiddenError, "403"),
    (TelegramNotFound, "404"), (TelegramConflictError, "409"), (TelegramServerError, "5xx"),
)


def status_of(exc: TelegramAPIError) -> str:
    return next((status for kind, status in _STATUS if isinstance(exc, kind)), "error")


class CountCalls(BaseRequestMiddleware):
    """Counts every Bot API call (each retry is a call) by method and outcome."""

    async def __call__(self, make_request: NextRequestMiddlewareType[T], bot: Bot,
                       method: TelegramMethod[T]) -> Response[T]:
        if not STATE.metrics:
            return await make_request(bot, method)
        name = method.__api_method__
        try:
            response = await make_request(bot, method)
        except TelegramAPIError as exc:
            PLATFORM_CALLS.labels("telegram", name, status_of(exc)).inc()
            raise
        PLATFORM_CALLS.labels("telegram", name, "200").inc()
        return response
