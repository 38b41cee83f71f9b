"""`POST /telegram/webhook`: Telegram's delivery, acknowledged once the update is recorded.

The secret token is compared in constant time; a wrong or missing one gets 401 and nothing
is read. A 200 goes back only after the update is stored (its turn started, its vote saved):
until then a crash means Telegram delivers it again, and an answer can take its time after.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable

from aiogram import Bot
from aiogram.types import Update
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

log = logging.getLogger(__name__)
WEBHOOK_PATH = "/telegram/webhook"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


def webhook_router(*, bot: Bot, secret: str, submit: Callable[[Update], asyncio.Future[None]],
                   started: Callable[[], bool], ack_timeout_s: float) -> APIRouter:
    """The route; `submit` starts an update and resolves once it is recorded."""

    async def receive(request: Request) -> JSONResponse:
        given = request.headers.get(SECRET_HEADER, "").encode()
        if not hmac.compare_digest(given, secret.encode()):
            return _error(401, "Unauthorized")
        if not started():
            return _error(503, "starting")  # Telegram delivers it again shortly
        try:
            update = Update.model_validate(await request.json(), context={"bot": bot})
        except (ValueError, ValidationError, RecursionError) as exc:  # never log the body
            log.warning("malformed telegram update: %s", type(exc).__name__)
            return _error(400, "bad update")
        recorded = submit(update)
        try:  # shielded: a timeout answers Telegram, it does not cancel the work
            await asyncio.wait_for(asyncio.shield(recorded), ack_timeout_s)
        except TimeoutError:
            return _error(503, "busy")
        except Exception:
            return _error(500, "not recorded")
        return JSONResponse({})

    router = APIRouter()
    router.add_api_route(WEBHOOK_PATH, receive, methods=["POST"], include_in_schema=False)
    return router


def _error(status: int, description: str) -> JSONResponse:
    return JSONResponse({"ok": False, "description": description}, status_code=status)
