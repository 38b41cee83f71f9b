"""The local web chat: a page, a streamed NDJSON answer endpoint, votes and corrections.

On by default only in `chatloop demo`. Under `chatloop serve` it must be enabled
and then requires an access token, so a gateway exposed for webhooks does not
expose an anonymous chat anyone could use to feed votes into training.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, Field

from bots.core import (
    APOLOGY,
    Accepted,
    ConversationCore,
    InboundMessage,
    Outcome,
    TurnResult,
    UnknownAnswer,
)

log = logging.getLogger(__name__)

CHANNEL = "web"
PAGE = Path(__file__).with_name("webchat.html")


class ChatIn(BaseModel):
    event_id: str = Field(min_length=1, max_length=128)
    chat_id: str = Field(min_length=1, max_length=128)
    user_id: str = Field(min_length=1, max_length=128)
    text: str = Field(max_length=100_000)  # the core enforces the configured, smaller cap


class VoteIn(BaseModel):
    answer_id: int
    user_id: str = Field(min_length=1, max_length=128)
    rating: int = Field(ge=-1, le=1)
    reason: str | None = Field(default=None, max_length=2000)


class CorrectionIn(BaseModel):
    answer_id: int
    user_id: str = Field(min_length=1, max_length=128)
    text: str = Field(min_length=1, max_length=8000)


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
    """The web chat channel; `token` None means open (demo only)."""

    name = CHANNEL

    def __init__(self, core: ConversationCore, *, token: str | None) -> None:
        self._core = core
        self._token = token
        self._tasks: set[asyncio.Task[Any]] = set()

    def _authorise(self, request: Request) -> None:
        if self._token is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self._token.encode()):
            raise HTTPException(status_code=401, detail="web chat access token required")

    def routes(self) -> APIRouter:
        router = APIRouter()
        auth = [Depends(self._authorise)]

        @router.get("/", response_class=HTMLResponse, include_in_schema=False)
        @router.get("/chat", response_class=HTMLResponse)
        async def page() -> str:  # the page itself holds no data; the API checks the token
            return PAGE.read_text()

        @router.post("/api/chat", dependencies=auth)
        async def chat(body: ChatIn) -> StreamingResponse:
            msg = InboundMessage(channel=CHANNEL, event_id=body.event_id, chat_id=body.chat_id,
                                 user_id=body.user_id, text=body.text)
            return StreamingResponse(self._stream(msg), media_type="application/x-ndjson")

        @router.post("/api/vote", dependencies=auth)
        async def vote(body: VoteIn) -> dict[str, Any]:
            if body.rating == 0:
                raise HTTPException(status_code=422, detail="rating must be 1 or -1")
            try:
                fb = await self._core.vote(answer_id=body.answer_id, voter_id=body.user_id,
                                           rating=body.rating, source=CHANNEL, reason=body.reason)
            except UnknownAnswer as exc:
                raise HTTPException(status_code=404, detail=str(exc)) from exc
            return {"answer_id": fb.answer_id, "rating": fb.rating}

        @router.post("/api/correction", dependencies=auth)
        async def correction(body: CorrectionIn) -> dict[str, Any]:
            if not body.text.strip():
                raise HTTPException(status_code=422, detail="a correction needs text")
            try:
                fb = await self._core.correct(answer_id=body.answer_id, voter_id=body.user_id,
                                              text=body.text.strip(), source=CHANNEL)
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
            while (event := await sink.events.get()) is not None:
                yield (json.dumps(event) + "\n").encode()
            if task.exception() is not None:
                log.error("web chat turn failed", exc_info=task.exception())
                yield (json.dumps({"type": "error", "text": APOLOGY}) + "\n").encode()
            elif task.result().outcome == Outcome.DUPLICATE:
                yield (json.dumps({"type": "duplicate"}) + "\n").encode()
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
