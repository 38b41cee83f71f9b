"""The local web chat: a page, a streamed NDJSON answer endpoint, votes and corrections.

On by default only in `chatloop demo`. Under `chatloop serve` it must be enabled
and then requires an access token, so a gateway exposed for webhooks does not
expose an anonymous chat anyone could use to feed votes into training.

Who is asking is the server's word, never the browser's: each browser gets an identity
(`web:<id>`) in a signed cookie (bots/webid.py), its conversations are its own (their chat
ids are prefixed with its id), and it may rate only its own answers. Its feedback is never
trusted unless the channel is told its user is the operator (`WebChat(operator=...)`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from bots.core import (
    APOLOGY,
    Accepted,
    ConversationCore,
    InboundMessage,
    Outcome,
    TurnResult,
    UnknownAnswer,
    identity,
)
from bots.webid import WebIdentities

log = logging.getLogger(__name__)

CHANNEL = "web"
PAGE = Path(__file__).with_name("webchat.html")
Body = TypeVar("Body", bound=BaseModel)
TOKEN_IN_QUERY = ("<!doctype html><title>chatloop</title><p>The access token goes after "
                  "<code>#</code>, never in the query: open <code>/chat#token=…</code> (or "
                  "<code>/chat</code> and enter it), and change the token that was sent here.")


# Bodies name no user: one sent anyway (as older pages did) is ignored like any unknown field.
class ChatIn(BaseModel):
    event_id: str = Field(min_length=1, max_length=64)  # stored after the 22-character id
    chat_id: str = Field(min_length=1, max_length=64)
    text: str = Field(max_length=100_000)  # the core enforces the configured, smaller cap


class VoteIn(BaseModel):
    answer_id: int
    rating: int = Field(ge=-1, le=1)
    reason: str | None = Field(default=None, max_length=2000)


class HandoffIn(BaseModel):
    chat_id: str = Field(min_length=1, max_length=64)


class CorrectionIn(BaseModel):
    answer_id: int
    text: str = Field(min_length=1, max_length=8000)


@dataclass(frozen=True, slots=True)
class Visitor:
    """The browser behind a request: its id, and whether it came without a valid cookie."""

    uid: str
    new: bool

    @property
    def who(self) -> str:
        return identity(CHANNEL, self.uid)


class QueueSink:
    """A ReplySink that turns the turn into NDJSON events for the browser."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._sent = ""

    async def begin(self) -> None:
        self.events.put_nowait({"type": "begin"})

    async def update(self, text: str) -> None:
        if text.startswith(self._sent):
            self.events.put_nowait({"type": "delta", "text": text[len(self._sent):]})
        else:
            self.events.put_nowait({"type": "replace", "text": text})
        self._sent = text

    async def finish(self, text: str, answer_id: int) -> str | None:
        self.events.put_nowait({"type": "done", "text": text, "answer_id": answer_id})
        return None

    async def fail(self, text: str) -> None:
        self.events.put_nowait({"type": "error", "text": text})

    async def notice(self, text: str) -> None:
        self.events.put_nowait({"type": "notice", "text": text})


@dataclass
class _WebTurn:
    accepted: Accepted | None = None  # set once the question is recorded


class WebChat:
    """The web chat channel; `token` None means open (demo only).

    `operator`: the person at the browser is this deployment's operator, whose feedback is
    trusted like a reviewer's. The one place the web channel decides trust: False under
    `serve` (web identities are never reviewers), for the demo's local operator only.
    """

    name = CHANNEL

    def __init__(self, core: ConversationCore, *, token: str | None, identities: WebIdentities,
                 operator: bool = False) -> None:
        self._core = core
        self._token = token
        self._ids = identities
        self._operator = operator
        self._tasks: set[asyncio.Task[Any]] = set()

    def _authorise(self, request: Request) -> None:
        if self._token is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self._token.encode()):
            raise HTTPException(status_code=401, detail="web chat access token required")

    async def _read(self, request: Request, model: type[Body]) -> Body:
        """The body as `model`, read and parsed only once the token is checked (401 first)."""
        self._authorise(request)
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as exc:  # bad JSON, too deeply nested, lone surrogates
            raise HTTPException(status_code=422, detail=exc.errors(
                include_url=False, include_context=False, include_input=False)) from None

    def _visitor(self, request: Request) -> Visitor:
        uid = self._ids.of(request)
        return Visitor(uid, False) if uid else Visitor(self._ids.issue(), True)

    def _welcome(self, response: Response, visitor: Visitor, request: Request) -> None:
        """Give a browser that came without a valid cookie the one for its new identity."""
        if visitor.new:
            self._ids.give(response, visitor.uid, request)

    def routes(self) -> APIRouter:
        router = APIRouter()

        @router.get("/", response_class=HTMLResponse, include_in_schema=False)
        @router.get("/chat", response_class=HTMLResponse)
        async def page(request: Request) -> HTMLResponse:
            # the page holds no data (the API checks the token); it brings the identity
            if "token" in request.query_params:  # a query string lands in access logs
                return HTMLResponse(TOKEN_IN_QUERY, status_code=400)
            visitor = self._visitor(request)
            response = HTMLResponse(PAGE.read_text())
            self._welcome(response, visitor, request)
            return response

        @router.post("/api/chat")
        async def chat(request: Request) -> StreamingResponse:
            body = await self._read(request, ChatIn)
            visitor = self._visitor(request)
            # the conversation and the delivery are the browser's own: prefixed with its id
            msg = InboundMessage(channel=CHANNEL, event_id=f"{visitor.uid}/{body.event_id}",
                                 chat_id=f"{visitor.uid}/{body.chat_id}", user_id=visitor.uid,
                                 text=body.text)
            response = StreamingResponse(self._stream(msg), media_type="application/x-ndjson")
            self._welcome(response, visitor, request)
            return response

        @router.post("/api/vote")
        async def vote(request: Request, response: Response) -> dict[str, Any]:
            body = await self._read(request, VoteIn)
            if body.rating == 0:
                raise HTTPException(status_code=422, detail="rating must be 1 or -1")
            visitor = self._visitor(request)
            self._welcome(response, visitor, request)
            try:
                fb = await self._core.vote(answer_id=body.answer_id, voter_id=visitor.who,
                                           rating=body.rating, source=CHANNEL, reason=body.reason,
                                           operator=self._operator)
            except UnknownAnswer as exc:  # not one, or not this browser's: the same 404
                raise HTTPException(status_code=404, detail=str(exc)) from exc
            return {"answer_id": fb.answer_id, "rating": fb.rating}

        @router.post("/api/handoff")
        async def handoff(request: Request, response: Response) -> dict[str, Any]:
            """The person's side of a hand-off (the console's inbox): its state and the
            operator's messages not shown yet; the page polls this while one is open."""
            body = await self._read(request, HandoffIn)
            visitor = self._visitor(request)
            self._welcome(response, visitor, request)
            found, relays = await self._core.handoff.outbox(
                channel=CHANNEL, chat_id=f"{visitor.uid}/{body.chat_id}", user=visitor.who)
            return {"status": found.status if found else None,
                    "agent": found.agent_name if found else None,
                    "messages": [{"text": r.text} for r in relays]}

        @router.post("/api/correction")
        async def correction(request: Request, response: Response) -> dict[str, Any]:
            body = await self._read(request, CorrectionIn)
            if not body.text.strip():
                raise HTTPException(status_code=422, detail="a correction needs text")
            visitor = self._visitor(request)
            self._welcome(response, visitor, request)
            try:
                fb = await self._core.correct(answer_id=body.answer_id, voter_id=visitor.who,
                                              text=body.text.strip(), source=CHANNEL,
                                              operator=self._operator)
            except UnknownAnswer as exc:
                raise HTTPException(status_code=404, detail=str(exc)) from exc
            return {"answer_id": fb.answer_id, "trusted": fb.trusted,
                    "review_status": fb.review_status}

        return router

    async def _stream(self, msg: InboundMessage) -> AsyncIterator[bytes]:
        sink = QueueSink()
        turn = _WebTurn()
        task = self._track(asyncio.create_task(self._turn(msg, sink, turn)))
        task.add_done_callback(lambda _: sink.events.put_nowait(None))
        try:
            done: dict[str, Any] | None = None  # sent once the turn says which route answered
            while (event := await sink.events.get()) is not None:
                if event["type"] == "done":
                    done = event
                    continue
                yield (json.dumps(event) + "\n").encode()
            if task.exception() is not None:
                log.error("web chat turn failed", exc_info=task.exception())
                yield (json.dumps({"type": "error", "text": APOLOGY}) + "\n").encode()
            elif task.result().outcome == Outcome.DUPLICATE:
                yield (json.dumps({"type": "duplicate"}) + "\n").encode()
            elif task.result().outcome in (Outcome.RELAYED, Outcome.ESCALATED):
                yield (json.dumps({"type": "handoff"}) + "\n").encode()  # a person answers
            elif done is not None:  # first which route answered (null: the base model)
                route = {"type": "route", "adapter": task.result().adapter,
                         "memory": task.result().memory_entry_id}  # an approved answer's
                yield (json.dumps(route) + "\n").encode()
                yield (json.dumps(done) + "\n").encode()
        finally:
            if not task.done():  # the browser went away: stop generating, close the turn
                task.cancel()
                self._track(asyncio.create_task(self._give_up(task, turn)))

    async def _turn(self, msg: InboundMessage, sink: QueueSink, turn: _WebTurn) -> TurnResult:
        accepted = await self._core.accept(msg, sink)
        if isinstance(accepted, TurnResult):
            return accepted
        turn.accepted = accepted
        return await self._core.answer(accepted, sink)

    async def _give_up(self, task: asyncio.Task[TurnResult], turn: _WebTurn) -> None:
        await asyncio.gather(task, return_exceptions=True)
        if turn.accepted is not None:
            await self._core.abandon(turn.accepted, "client_gone")

    def _track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
