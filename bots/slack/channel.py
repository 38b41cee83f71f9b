"""The Slack channel: slack-bolt wiring between Slack requests, the core and the Web API.

Every listener runs before bolt answers Slack (`process_before_response=True`) and does
only fast work: the inbox record (the question and its event_id, in one transaction),
then the answer runs as a tracked background task. So the acknowledgement is sent after
the record is durable, a retry (`X-Slack-Retry-Num`) or duplicate finds it and is
answered once, and a crash after the acknowledgement is answered by `resume` at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from slack_bolt.adapter.fastapi.async_handler import AsyncSlackRequestHandler
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext

from bots.core import Accepted, ConversationCore, InboundMessage, Resumed, UnknownAnswer
from bots.slack import convert, render
from bots.slack.api import SlackApi, SlackError
from bots.slack.convert import CHANNEL, Kind
from bots.slack.guard import check_request
from bots.slack.handoff import GIVE_BACK, TAKE, SlackHandoff
from bots.slack.pacing import Pacing
from bots.slack.sink import SlackSink, Target

log = logging.getLogger(__name__)
STOP_GRACE_S = 10.0  # in-flight answers get this long to finish at shutdown


class SlackChannel:
    """Slack over the Events API (`POST /slack/events`) or Socket Mode (`app_token`)."""

    name = CHANNEL

    def __init__(self, *, core: ConversationCore, app: AsyncApp, api: SlackApi, pacing: Pacing,
                 app_token: str | None = None, agent_corrections: bool = False,
                 max_answers: int = 64, signing_secret: str | None = None,
                 handoff_channel: str | None = None, handoff_sweep_s: float = 5.0) -> None:
        self._core, self._app, self._api, self._pacing = core, app, api, pacing
        # HTTP mode: requests are verified on their raw bytes before bolt parses them
        self._signing_secret = signing_secret
        # answers beyond this wait (recorded, in order): under overload the background
        # work cannot starve the acknowledgements, which must stay within Slack's 3 s
        self._answers = asyncio.Semaphore(max_answers)
        self._agent_corrections = agent_corrections
        self._app_token = app_token
        self._socket: AsyncSocketModeHandler | None = None  # made in start(), inside the loop
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.bot_user_id: str | None = None
        self.team_id: str | None = None
        # hand-off: escalations in the agents' channel (bots.slack.handoff)
        self._handoff = (SlackHandoff(core, api, channel=handoff_channel)
                         if handoff_channel else None)
        self._handoff_sweep_s = handoff_sweep_s
        self._handoff_timers: asyncio.Task[None] | None = None
        app.event("app_mention")(self._on_event)
        app.event("message")(self._on_event)
        app.action(render.VOTE_UP)(self._on_vote)
        app.action(render.VOTE_DOWN)(self._on_vote)
        app.action(render.SUGGEST)(self._on_suggest)
        app.view(render.CORRECTION_VIEW)(self._on_correction)
        app.action(render.HUMAN)(self._on_human)
        app.action(TAKE)(self._on_handoff_button)
        app.action(GIVE_BACK)(self._on_handoff_button)

    def routes(self) -> APIRouter | None:
        if self._app_token is not None:
            return None
        handler, router = AsyncSlackRequestHandler(self._app), APIRouter()

        @router.post("/slack/events", include_in_schema=False)
        async def events(request: Request) -> Response:  # Events API and interactivity
            refused = check_request(await request.body(), request.headers,
                                    self._signing_secret)
            if refused is not None:  # one short line, never the body
                log.warning("slack: refused a request (%s): %s", refused.status, refused.reason)
                return Response(status_code=refused.status)
            return await handler.handle(request)  # bolt reads the body cached above

        return router

    async def start(self) -> None:
        await self._api.open()
        try:
            me = await self._api.auth_test()
            self.bot_user_id, self.team_id = me.get("user_id"), me.get("team_id")
        except SlackError as exc:  # bolt checks again on the first request
            log.warning("slack: auth.test failed at start-up: %s", exc.code)
        await self._start_resume()
        # later: what another replica left when it crashed
        self._sweeper = asyncio.create_task(self._core.resume_forever(CHANNEL, self._sink_for))
        if self._handoff is not None:
            self._handoff_timers = asyncio.create_task(
                self._handoff.sweep_forever(self._handoff_sweep_s))
        if self._app_token is not None:
            self._socket = AsyncSocketModeHandler(self._app, self._app_token,
                                                  web_client=self._api.client)
            await self._socket.connect_async()

    async def _start_resume(self) -> None:
        """Answer events recorded before a crash; returns once they are listed.

        Waiting for the list (not the answers) keeps start-up fast, and events accepted
        from now on cannot be in that list, so none is answered twice.
        """
        listed = asyncio.Event()

        async def sink_for(msg: InboundMessage, resumed: Resumed) -> SlackSink:
            listed.set()  # resume lists every pending event before it asks for a sink
            return await self._sink_for(msg, resumed)

        task = self._spawn(self._core.resume(CHANNEL, sink_for))
        task.add_done_callback(lambda _: listed.set())
        await listed.wait()

    async def _sink_for(self, msg: InboundMessage, _: Resumed) -> SlackSink:
        team, user = convert.split_user(msg.user_id)
        return self._sink(msg.chat_id, msg.thread_id, user, team or self.team_id)

    async def stop(self) -> None:
        for task in (self._sweeper, self._handoff_timers):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._socket is not None:
            await self._socket.close_async()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=STOP_GRACE_S)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._api.close()

    async def idle(self) -> None:
        """Wait until no answer, notice or edit is in progress (tests, benchmarks)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("slack: background task failed", exc_info=task.exception())

    def _sink(self, channel: str, thread_ts: str, user: str | None,
              team: str | None) -> SlackSink:
        return SlackSink(self._api, Target(channel, thread_ts, user, team), self._pacing,
                         self._spawn, human_button=self._handoff is not None)

    async def _on_event(self, body: dict[str, Any], context: AsyncBoltContext) -> None:
        found = convert.inbound(body, bot_user_id=context.bot_user_id or self.bot_user_id)
        if found is None:
            return
        msg = found.message
        if self._handoff is not None and msg.chat_id == self._handoff.channel:
            if found.kind == Kind.THREAD:  # an agent in an escalation's thread
                await self._handoff.on_agent(msg)
            return
        if found.kind == Kind.THREAD:  # a follow-up, if the bot is part of this thread
            if not await self._core.knows_thread(msg):
                return
            if self._agent_corrections and self._core.is_reviewer(msg.author):
                # a reviewer answering in the thread after the bot corrects its answer
                await self._core.reviewer_reply(msg, source="slack_thread")
                return
        _, user = convert.split_user(msg.user_id)
        sink = self._sink(msg.chat_id, msg.thread_id, user, found.team_id or self.team_id)
        accepted = await self._core.accept(msg, sink)
        if isinstance(accepted, Accepted):
            self._spawn(self._answer(accepted, sink))
        elif self._handoff is not None and (accepted.relay or accepted.handoff):
            self._spawn(self._handoff.after_turn(accepted))

    async def _on_human(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        """"Talk to a person" under an answer: asked like `/human`, in the answer's thread."""
        await ack()
        click = convert.click(body)
        if click is None or not click.voter_id or self._handoff is None:
            return
        team, _, user = click.voter_id.partition(":")[2].rpartition("/")
        action_ts = str((body.get("actions") or [{}])[0].get("action_ts") or click.message_ts)
        msg = InboundMessage(channel=CHANNEL, event_id=f"action:{click.message_ts}:{action_ts}",
                             chat_id=click.channel_id, user_id=convert.user_key(team, user),
                             text="/human button",
                             thread_id=click.message.get("thread_ts") or click.message_ts)
        sink = self._sink(click.channel_id, msg.thread_id, user, team or self.team_id)
        result = await self._core.accept(msg, sink)
        if not isinstance(result, Accepted):
            self._spawn(self._handoff.after_turn(result))

    async def _on_handoff_button(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        if self._handoff is not None:
            self._spawn(self._handoff.on_button(body))

    async def _answer(self, accepted: Accepted, sink: SlackSink) -> None:
        async with self._answers:
            result = await self._core.answer(accepted, sink)
        if sink.error is not None and result.answer_id is not None:
            await self._core.delivery_failed(result.answer_id, f"slack:{sink.error}")

    async def _on_vote(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        click = convert.click(body)
        if click is None or not click.voter_id:
            return
        rating = 1 if body["actions"][0].get("action_id") == render.VOTE_UP else -1
        try:
            stored = await self._core.vote(answer_id=click.answer_id, voter_id=click.voter_id,
                                           rating=rating, source=CHANNEL)
        except UnknownAnswer:
            log.warning("slack: vote on unknown answer %s", click.answer_id)
            return
        if stored.handoff is not None and self._handoff is not None:  # N 👎: a person
            self._spawn(self._handoff.after_vote(stored.handoff))
        self._spawn(self._quietly(self._api.update(
            channel=click.channel_id, ts=click.message_ts, text=click.message.get("text", ""),
            blocks=render.revote_blocks(click.message, click.answer_id, rating))))

    async def _on_suggest(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        click = convert.click(body)
        if click is not None:
            view = render.correction_modal(click.answer_id, click.message.get("text", ""))
            self._spawn(self._quietly(self._api.open_view(trigger_id=click.trigger_id,
                                                          view=view)))

    async def _on_correction(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        found = convert.suggestion(body)
        if found is None or not found.voter_id:
            await ack()
            return
        if not found.text:
            await ack(response_action="errors",
                      errors={render.CORRECTION_BLOCK: "Please write the better answer."})
            return
        try:
            await self._core.correct(answer_id=found.answer_id, voter_id=found.voter_id,
                                     text=found.text, source=CHANNEL)
        except UnknownAnswer:
            await ack(response_action="errors",
                      errors={render.CORRECTION_BLOCK: "That answer no longer exists."})
            return
        await ack()

    @staticmethod
    async def _quietly(call: Coroutine[Any, Any, Any]) -> None:
        try:
            await call
        except SlackError as exc:
            log.warning("slack: %s failed: %s", exc.method, exc.code)
