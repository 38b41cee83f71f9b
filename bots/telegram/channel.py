"""The Telegram channel: intake (polling or webhook), ordered lanes, core turns, feedback.

Every update is recorded (its question accepted by the core, or its vote or correction
stored) before it is confirmed to Telegram: by the polling offset, or by the webhook's 200.
Recording runs in order per conversation and is quick; answers then run in order per
conversation too, so a long answer never holds back the confirmation of later updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from aiogram import Bot
from aiogram.types import BotCommand, Update, User
from fastapi import APIRouter

from bots.core import Accepted, ConversationCore, InboundMessage, ReplySink, Resumed
from bots.limits import shared_buckets
from bots.telegram import convert
from bots.telegram.convert import CHANNEL, Action, Ask, Correct, StaleButton, TextOnly, Vote
from bots.telegram.feedback import Feedback
from bots.telegram.handoff import AgentSays, HumanButton, TelegramHandoff
from bots.telegram.lanes import Lanes
from bots.telegram.outbound import DeliveryError, RetryPolicy, Target, TelegramApi, call
from bots.telegram.polling import poll_forever
from bots.telegram.sink import Pacer, TelegramSink
from bots.telegram.webhook import webhook_router

log = logging.getLogger(__name__)
_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")
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
    sends_per_s: float = 20.0  # the bot's send budget, every replica together (sink.Pacer)
    preview_after_s: float = 0.25  # no preview before: an answer done by then is sent once
    poll_timeout_s: int = 25
    settle_s: float = 0.2  # polling: wait this long for recording before polling again
    webhook_ack_timeout_s: float = 10.0  # then 503, and Telegram delivers it again
    drain_s: float = 20.0  # on stop: let answers in progress finish
    agents_chat: int | None = None  # hand-off: the agents' forum supergroup (bots.telegram.handoff)
    handoff_sweep_s: float = 5.0  # hand-off timers: how often they are checked


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
        if options.webhook_secret and not _SECRET.fullmatch(options.webhook_secret):
            raise ValueError("CHATLOOP_TELEGRAM_WEBHOOK_SECRET must be 1-256 characters of "
                             "A-Z, a-z, 0-9, _ and -")
        self.core, self.bot, self.options = core, bot, options
        self.api = TelegramApi(bot, retry)
        self._pacer = Pacer(buckets=shared_buckets(), bot=str(bot.id),
                            per_second=options.sends_per_s)
        self.api.budget = self._pacer.send
        self._intake = Lanes()  # recording: accept a question, store a vote or a correction
        self._answers = Lanes()  # generating and streaming answers
        self._inflight: dict[int, asyncio.Future[None]] = {}
        self._ready = asyncio.Event()  # set once unfinished turns have been resumed
        self._runner: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._me: User | None = None
        self._feedback: Feedback | None = None
        self._handoff: TelegramHandoff | None = None
        if options.agents_chat is not None:
            self._handoff = TelegramHandoff(core, self.api, agents_chat=options.agents_chat)
        self._handoff_timers: asyncio.Task[None] | None = None

    def routes(self) -> APIRouter | None:
        if self.options.mode != "webhook":
            return None
        return webhook_router(bot=self.bot, secret=self.options.webhook_secret or "",
                              submit=self.submit, started=lambda: self._me is not None,
                              ack_timeout_s=self.options.webhook_ack_timeout_s)

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
        # later: what another replica (webhook mode) left when it crashed
        self._sweeper = asyncio.create_task(self.core.resume_forever(CHANNEL, self._sink_for))
        if self._handoff is not None:
            self._handoff_timers = asyncio.create_task(
                self._handoff.sweep_forever(self.options.handoff_sweep_s))
        while self.options.mode == "polling":
            try:
                await poll_forever(self.bot, self.submit, timeout_s=self.options.poll_timeout_s,
                                   settle_s=self.options.settle_s)
                return  # the token was rejected
            except Exception:
                log.exception("telegram polling crashed: restarting it")
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        for task in (self._runner, self._sweeper, self._handoff_timers):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for lanes in (self._intake, self._answers):  # answers are queued by the intake
            if not await lanes.join(self.options.drain_s):
                log.warning("telegram: %s jobs still running after %ss: cancelling them",
                            len(lanes), self.options.drain_s)
                await lanes.cancel()
        await self.bot.session.close()

    def submit(self, update: Update) -> asyncio.Future[None]:
        """Start handling `update`; the future resolves once it is recorded (or needs none)."""
        known = self._inflight.get(update.update_id)
        if known is not None:
            return known
        assert self._me is not None, "start() first"
        try:
            action = (self._handoff and self._handoff.classify(update, self._me)
                      ) or convert.classify(update, self._me)
        except Exception:  # an update we cannot read must not stop the intake
            log.exception("cannot classify telegram update %s: skipped", update.update_id)
            action = convert.Skip("unreadable")
        recorded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        key = (("agents", action.thread) if isinstance(action, AgentSays) else
               convert.lane(action.ask) if isinstance(action, HumanButton) else
               convert.lane(action))
        if key is None:
            recorded.set_result(None)
            return recorded
        self._inflight[update.update_id] = recorded
        self._intake.submit(key, lambda: self._record(update.update_id, key, action, recorded))
        return recorded

    async def _record(self, update_id: int, key: Hashable, action: Action,
                      recorded: asyncio.Future[None]) -> None:
        try:
            await self._ready.wait()
            answer = await self._act(action, recorded)
        except BaseException as exc:
            if not recorded.done():
                recorded.set_exception(exc if isinstance(exc, Exception) else RuntimeError(exc))
            raise
        finally:
            if not recorded.done():
                recorded.set_result(None)
            self._inflight.pop(update_id, None)
        if answer is not None:
            self._answers.submit(key, answer)

    async def _act(self, action: Action, recorded: asyncio.Future[None]
                   ) -> Callable[[], Awaitable[None]] | None:
        """Record the action (and do what needs no model); return the answer job, if any."""
        assert self._feedback is not None
        if isinstance(action, HumanButton) and self._handoff is not None:
            await self._handoff.answer_button(action.query_id)
            action = action.ask
        if isinstance(action, AgentSays) and self._handoff is not None:
            await self._handoff.on_agent(action)
        elif isinstance(action, Ask):
            shown = self._sink(action.where)
            sink = _Recorded(shown, recorded)
            accepted = await self.core.accept(action.message, sink)
            if isinstance(accepted, Accepted):
                shown.on_showing = self._note_showing(accepted.turn.event_id)
                return lambda: self._answer(accepted, sink, shown)
            bridge = self._handoff
            if bridge is not None and (accepted.relay is not None or accepted.handoff):
                return lambda: bridge.after_turn(accepted)
        elif isinstance(action, Vote):
            handoff = await self._feedback.vote(action)
            bridge = self._handoff
            if handoff is not None and bridge is not None:  # N 👎: a person is asked for
                return lambda: bridge.after_vote(handoff)
        elif isinstance(action, Correct):
            await self._feedback.correct(action, self._sink(action.where))
        elif isinstance(action, TextOnly):
            if await self._feedback.first_delivery(action.update_id):
                await self._sink(action.where).notice(convert.TEXT_ONLY)
        elif isinstance(action, StaleButton):
            await self._feedback.stale_button(action.query_id)
        return None

    async def _answer(self, accepted: Accepted, sink: ReplySink, shown: TelegramSink) -> None:
        result = await self.core.answer(accepted, sink)
        if shown.error is not None and result.answer_id is not None:
            await self.core.delivery_failed(result.answer_id, f"telegram:{shown.error}")

    def _sink(self, where: Target, showing: int | None = None) -> TelegramSink:
        return TelegramSink(self.api, where, self._pacer,
                            draft_interval=self.options.draft_interval_s,
                            edit_interval=self.options.edit_interval_s,
                            preview_after=self.options.preview_after_s, showing=showing,
                            human_button=self._handoff is not None)

    def _note_showing(self, event_id: int) -> Callable[[int], Awaitable[None]]:
        async def note(message_id: int) -> None:
            await self.core.note_shown(event_id, str(message_id))
        return note

    async def _sink_for(self, msg: InboundMessage, resumed: Resumed) -> ReplySink:
        showing = int(resumed.shown_ref) if resumed.shown_ref else None
        sink = self._sink(convert.target_for(msg), showing)
        sink.on_showing = self._note_showing(resumed.event_id)
        return sink


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

