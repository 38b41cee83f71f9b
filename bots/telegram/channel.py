"""The Telegram channel: intake (polling or webhook), ordered lanes, core turns, feedback.

Every update is recorded (its turn started in the core, or its vote or correction stored)
before it is confirmed to Telegram: by the polling offset, or by the webhook's 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from dataclasses import dataclass

from aiogram import Bot
from aiogram.types import BotCommand, Update, User
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from bots.core import ConversationCore, InboundMessage, ReplySink
from bots.telegram import convert
from bots.telegram.convert import CHANNEL, Action, Ask, Correct, StaleButton, TextOnly, Vote
from bots.telegram.feedback import Feedback
from bots.telegram.lanes import Lanes
from bots.telegram.outbound import DeliveryError, RetryPolicy, Target, TelegramApi, call
from bots.telegram.polling import poll_forever
from bots.telegram.sink import Pacer, TelegramSink

log = logging.getLogger(__name__)
WEBHOOK_PATH = "/telegram/webhook"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
COMMANDS = [BotCommand(command="start", description="What this bot does"),
            BotCommand(command="help", description="How to ask and rate answers"),
            BotCommand(command="reset", description="Start a new conversation")]


@dataclass(frozen=True, slots=True)
class TelegramOptions:
    mode: str = "polling"  # or "webhook"
    webhook_url: str | None = None
    webhook_secret: str | None = None
    draft_interval_s: float = 1.0  # private chats: sendMessageDraft
    edit_interval_s: float = 3.0  # groups: editMessageText, ~20 per minute per group
    poll_timeout_s: int = 25
    settle_s: float = 0.2  # polling: wait this long for recording before polling again
    webhook_ack_timeout_s: float = 20.0  # then 503, and Telegram delivers it again
    drain_s: float = 20.0  # on stop: let answers in progress finish


class TelegramChannel:
    """Telegram for the gateway; wraps an aiogram Bot pointed at any Bot API server."""

    name = CHANNEL

    def __init__(self, *, core: ConversationCore, bot: Bot, options: TelegramOptions,
                 retry: RetryPolicy | None = None) -> None:
        if options.mode not in ("polling", "webhook"):
            raise ValueError(f"telegram mode must be polling or webhook, not {options.mode!r}")
        if options.mode == "webhook" and not (options.webhook_url and options.webhook_secret):
            raise ValueError("telegram webhook mode needs CHATLOOP_TELEGRAM_WEBHOOK_URL and "
                             "CHATLOOP_TELEGRAM_WEBHOOK_SECRET")
        self.core, self.bot, self.options = core, bot, options
        self.api = TelegramApi(bot, retry)
        self._pacer = Pacer()
        self._lanes = Lanes()
        self._inflight: dict[int, asyncio.Future[None]] = {}
        self._ready = asyncio.Event()  # set once unfinished turns have been resumed
        self._runner: asyncio.Task[None] | None = None
        self._me: User | None = None
        self._feedback: Feedback | None = None

    def routes(self) -> APIRouter | None:
        if self.options.mode != "webhook":
            return None
        router = APIRouter()
        router.add_api_route(WEBHOOK_PATH, self._webhook, methods=["POST"],
                             include_in_schema=False)
        return router

    async def start(self) -> None:
        self._me = await call(self.bot.me, RetryPolicy(attempts=3))
        self._feedback = Feedback(self.core, self.api, self._me)
        try:
            await call(lambda: self.bot.set_my_commands(COMMANDS), RetryPolicy(attempts=2))
        except DeliveryError as exc:
            log.warning("setMyCommands failed: %s", exc)
        if self.options.mode == "webhook":
            await call(lambda: self.bot.set_webhook(
                url=self.options.webhook_url or "", secret_token=self.options.webhook_secret,
                allowed_updates=convert.UPDATE_TYPES), RetryPolicy(attempts=3))
        else:  # getUpdates answers 409 while a webhook is set
            await call(lambda: self.bot.delete_webhook(drop_pending_updates=False),
                       RetryPolicy(attempts=3))
        self._runner = asyncio.create_task(self._run())
        log.info("telegram bot @%s started (%s)", self._me.username, self.options.mode)

    async def _run(self) -> None:
        try:
            resumed = await self.core.resume(CHANNEL, self._sink_for)
            if resumed:
                log.info("answered %s telegram messages left unfinished by a restart", resumed)
        except Exception:
            log.exception("resuming unfinished telegram turns failed")
        self._ready.set()
        while self.options.mode == "polling":
            try:
                await poll_forever(self.bot, self.submit, timeout_s=self.options.poll_timeout_s,
                                   settle_s=self.options.settle_s)
                return  # the token was rejected
            except Exception:
                log.exception("telegram polling crashed: restarting it")
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if not await self._lanes.join(self.options.drain_s):
            log.warning("telegram: %s jobs still running after %ss: cancelling them",
                        len(self._lanes), self.options.drain_s)
            await self._lanes.cancel()
        await self.bot.session.close()

    def submit(self, update: Update) -> asyncio.Future[None]:
        """Start handling `update`; the future resolves once it is recorded (or needs none)."""
        known = self._inflight.get(update.update_id)
        if known is not None:
            return known
        assert self._me is not None, "start() first"
        try:
            action = convert.classify(update, self._me)
        except Exception:  # an update we cannot read must not stop the intake
            log.exception("cannot classify telegram update %s: skipped", update.update_id)
            action = convert.Skip("unreadable")
        recorded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        key = convert.lane(action)
        if key is None:
            recorded.set_result(None)
            return recorded
        self._inflight[update.update_id] = recorded
        self._lanes.submit(key, lambda: self._perform(update.update_id, action, recorded))
        return recorded

    async def _perform(self, update_id: int, action: Action,
                       recorded: asyncio.Future[None]) -> None:
        try:
            await self._ready.wait()
            await self._act(action, recorded)
        except BaseException as exc:
            if not recorded.done():
                recorded.set_exception(exc if isinstance(exc, Exception) else RuntimeError(exc))
            raise
        finally:
            if not recorded.done():
                recorded.set_result(None)
            self._inflight.pop(update_id, None)

    async def _act(self, action: Action, recorded: asyncio.Future[None]) -> None:
        assert self._feedback is not None
        if isinstance(action, Ask):
            sink = _Recorded(self._sink(action.where), recorded)
            await self.core.handle(action.message, sink)
        elif isinstance(action, Vote):
            await self._feedback.vote(action)
        elif isinstance(action, Correct):
            await self._feedback.correct(action, self._sink(action.where))
        elif isinstance(action, TextOnly):
            if await self._feedback.first_delivery(action.update_id):
                await self._sink(action.where).notice(convert.TEXT_ONLY)
        elif isinstance(action, StaleButton):
            await self._feedback.stale_button(action.query_id)

    def _sink(self, where: Target) -> TelegramSink:
        return TelegramSink(self.api, where, self._pacer,
                            draft_interval=self.options.draft_interval_s,
                            edit_interval=self.options.edit_interval_s)

    async def _sink_for(self, msg: InboundMessage) -> ReplySink:
        return self._sink(convert.target_for(msg))

    async def _webhook(self, request: Request) -> JSONResponse:
        given = request.headers.get(SECRET_HEADER, "").encode()
        secret = (self.options.webhook_secret or "").encode()
        if not hmac.compare_digest(given, secret):
            return JSONResponse({"ok": False, "description": "Unauthorized"}, status_code=401)
        if self._me is None:
            return JSONResponse({"ok": False, "description": "starting"}, status_code=503)
        try:
            update = Update.model_validate(await request.json(), context={"bot": self.bot})
        except (ValueError, ValidationError) as exc:
            log.warning("malformed telegram update: %s", exc)
            return JSONResponse({"ok": False, "description": "bad update"}, status_code=400)
        recorded = self.submit(update)
        try:  # shielded: a timeout answers Telegram, it does not cancel the turn
            await asyncio.wait_for(asyncio.shield(recorded), self.options.webhook_ack_timeout_s)
        except TimeoutError:
            return JSONResponse({"ok": False, "description": "busy"}, status_code=503)
        except Exception:
            return JSONResponse({"ok": False, "description": "not recorded"}, status_code=500)
        return JSONResponse({})


class _Recorded:
    """Passes a ReplySink through, resolving `recorded` on the first call: the core calls its
    sink only after the turn (or the command's event) is stored."""

    def __init__(self, sink: ReplySink, recorded: asyncio.Future[None]) -> None:
        self._sink, self._recorded = sink, recorded

    def _mark(self) -> None:
        if not self._recorded.done():
            self._recorded.set_result(None)

    async def begin(self) -> None:
        self._mark()
        await self._sink.begin()

    async def update(self, text: str) -> None:
        await self._sink.update(text)

    async def finish(self, text: str, answer_id: int) -> str | None:
        self._mark()
        return await self._sink.finish(text, answer_id)

    async def fail(self, text: str) -> None:
        self._mark()
        await self._sink.fail(text)

    async def notice(self, text: str) -> None:
        self._mark()
        await self._sink.notice(text)

