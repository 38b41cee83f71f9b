"""A fake Slack Web API (and Socket Mode link) on loopback, faithful to Slack's envelopes (S4-S6).

Real slack_sdk / slack-bolt clients talk to it through `base_url`. It keeps the messages
the bot posted (streamed ones assembled from their chunks), logs every call, and injects
errors: `fail(method, error)` answers `{"ok": false, "error": ...}`, `rate_limit(method)`
answers HTTP 429 with `Retry-After`, `kill_streams_after(n)` ends every stream after n
appends (`message_not_in_streaming_state`), `gone[channel] = error` refuses a channel.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

BOT = {"user_id": "U0BOT", "bot_id": "B0BOT", "team_id": "T111", "user": "testbot"}


@dataclass
class Call:
    method: str
    args: dict[str, Any]
    status: int
    error: str | None


@dataclass
class Posted:
    """A message the bot posted; `text` is what it shows (streamed chunks joined)."""

    channel: str
    ts: str
    thread_ts: str | None
    text: str
    blocks: list[dict[str, Any]] = field(default_factory=list)
    streaming: bool = False
    appends: int = 0
    edits: int = 0
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def feedback(self) -> dict[str, Any] | None:
        return next((b for b in self.blocks if b.get("block_id") == "feedback"), None)

    def payload(self) -> dict[str, Any]:
        """The message as Slack puts it in a block_actions payload (a reply carries its
        thread's `thread_ts`)."""
        msg = {"type": "message", "ts": self.ts, "user": BOT["user_id"],
               "bot_id": BOT["bot_id"], "text": self.text, "blocks": self.blocks}
        if self.thread_ts:
            msg["thread_ts"] = self.thread_ts
        return msg

    def click(self, action_id: str, *, user: str = "U222", name: str = "ann",
              team: str = "T111", action_ts: str = "1735689610.194939") -> dict[str, Any]:
        """The block_actions payload Slack sends when `user` presses the button `action_id`
        on this message, in whatever channel it is (S3)."""
        button = next(e for b in self.blocks if b.get("type") == "actions"
                      for e in b.get("elements") or [] if e.get("action_id") == action_id)
        block = next(b["block_id"] for b in self.blocks
                     if button in (b.get("elements") or []))
        return {
            "type": "block_actions", "api_app_id": "A111", "token": "verification_token",
            "user": {"id": user, "username": name, "name": name, "team_id": team},
            "trigger_id": "111.222.valid", "team": {"id": team, "domain": "ws"},
            "container": {"type": "message", "message_ts": self.ts,
                          "channel_id": self.channel, "is_ephemeral": False},
            "channel": {"id": self.channel, "name": self.channel.lower()},
            "message": self.payload(), "state": {"values": {}},
            "response_url": f"https://hooks.slack.com/actions/{team}/111/xyz",
            "actions": [{**button, "block_id": block, "action_ts": action_ts}]}


class FakeSlack:
    def __init__(self, *, token: str = "xoxb-test", app_token: str = "xapp-test") -> None:
        self.token, self.app_token = token, app_token
        self.calls: list[Call] = []
        self.messages: dict[str, Posted] = {}
        self.views: list[dict[str, Any]] = []
        self.gone: dict[str, str] = {}
        self.url = ""
        self._errors: dict[str, deque[str]] = defaultdict(deque)
        self._limits: dict[str, deque[int]] = defaultdict(deque)
        self._kill_after: int | None = None
        self._ts = itertools.count(1)
        self._sockets: list[web.WebSocketResponse] = []
        self._acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.changed = asyncio.Event()

    # ---- injection -------------------------------------------------------------
    def fail(self, method: str, error: str, times: int = 1) -> None:
        self._errors[method].extend([error] * times)

    def rate_limit(self, method: str, times: int = 1, retry_after: int = 0) -> None:
        self._limits[method].extend([retry_after] * times)

    def kill_streams_after(self, appends: int | None) -> None:
        self._kill_after = appends

    # ---- inspection ------------------------------------------------------------
    def count(self, method: str) -> int:
        return sum(1 for c in self.calls if c.method == method)

    def thread(self, channel: str, thread_ts: str) -> list[Posted]:
        return [m for m in self.messages.values()
                if m.channel == channel and m.thread_ts == thread_ts]

    async def wait_for(self, check: Callable[[], Any], within: float = 10.0) -> Any:
        deadline = time.monotonic() + within
        while not (result := check()):
            if time.monotonic() > deadline:
                raise TimeoutError("the fake Slack never saw what the test waited for")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), 0.05)
            except TimeoutError:
                pass
        return result

    # ---- HTTP ------------------------------------------------------------------
    @asynccontextmanager
    async def serve(self) -> AsyncIterator[FakeSlack]:
        app = web.Application()
        app.router.add_post("/api/{method}", self._handle)
        app.router.add_get("/api/{method}", self._handle)
        app.router.add_get("/link", self._socket)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/api/"
        try:
            yield self
        finally:
            for ws in self._sockets:
                await ws.close()
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args = await _args(request)
        status, body, headers = self._answer(method, args, request.headers)
        self.calls.append(Call(method, args, status, None if body.get("ok") else body["error"]))
        self.changed.set()
        return web.json_response(body, status=status, headers=headers)

    def _answer(self, method: str, args: dict[str, Any],
                headers: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        if self._limits[method]:
            after = self._limits[method].popleft()
            return 429, {"ok": False, "error": "ratelimited"}, {"Retry-After": str(after)}
        wanted = self.app_token if method == "apps.connections.open" else self.token
        given = headers.get("Authorization", "").removeprefix("Bearer ") or args.get("token")
        if not given:
            return 200, {"ok": False, "error": "not_authed"}, {}
        if given != wanted:
            return 200, {"ok": False, "error": "invalid_auth"}, {}
        if self._errors[method]:
            return 200, {"ok": False, "error": self._errors[method].popleft()}, {}
        if args.get("channel") in self.gone:
            return 200, {"ok": False, "error": self.gone[args["channel"]]}, {}
        handler = getattr(self, "_" + method.replace(".", "_"), None)
        if handler is None:
            return 200, {"ok": False, "error": "unknown_method"}, {}
        result = handler(args)
        if "error" in result:
            return 200, {"ok": False, **result}, {}
        return 200, {"ok": True, **result}, {}

    def _next_ts(self) -> str:
        return f"{1735690000 + next(self._ts)}.000100"

    # ---- methods ---------------------------------------------------------------
    def _auth_test(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"url": "https://ws.slack.com/", "team": "WS", "is_enterprise_install": False,
                **BOT}

    def _chat_postMessage(self, args: dict[str, Any]) -> dict[str, Any]:
        text, blocks = args.get("text") or "", args.get("blocks") or []
        if not text and not blocks:
            return {"error": "no_text"}
        if len(text) > 40_000:
            return {"error": "msg_too_long"}
        msg = Posted(args["channel"], self._next_ts(), args.get("thread_ts"), text, blocks,
                     args=args)
        self.messages[msg.ts] = msg
        return {"channel": msg.channel, "ts": msg.ts, "message": msg.payload()}

    def _chat_update(self, args: dict[str, Any]) -> dict[str, Any]:
        msg = self.messages.get(args.get("ts", ""))
        if msg is None or msg.channel != args.get("channel"):
            return {"error": "message_not_found"}
        if msg.streaming:
            return {"error": "cant_update_message"}
        if not args.get("text") and not args.get("blocks"):
            return {"error": "no_text"}
        msg.text, msg.blocks, msg.edits = args.get("text") or "", args.get("blocks") or [], \
            msg.edits + 1
        return {"channel": msg.channel, "ts": msg.ts, "text": msg.text,
                "message": msg.payload()}

    def _chat_startStream(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args.get("thread_ts"):
            return {"error": "invalid_arguments"}
        if not args["channel"].startswith("D") and not (
                args.get("recipient_team_id") and args.get("recipient_user_id")):
            return {"error": "missing_recipient_team_id"}
        msg = Posted(args["channel"], self._next_ts(), args["thread_ts"], _chunk_text(args),
                     streaming=True, args=args)
        self.messages[msg.ts] = msg
        return {"channel": msg.channel, "ts": msg.ts}

    def _streaming(self, args: dict[str, Any]) -> Posted | dict[str, Any]:
        msg = self.messages.get(args.get("ts", ""))
        if msg is None:
            return {"error": "message_not_found"}
        if not msg.streaming:
            return {"error": "message_not_in_streaming_state"}
        return msg

    def _chat_appendStream(self, args: dict[str, Any]) -> dict[str, Any]:
        msg = self._streaming(args)
        if isinstance(msg, dict):
            return msg
        if self._kill_after is not None and msg.appends >= self._kill_after:
            msg.streaming = False  # Slack ended the stream (it expired server-side)
            return {"error": "message_not_in_streaming_state"}
        msg.text += _chunk_text(args)
        msg.appends += 1
        return {"channel": msg.channel, "ts": msg.ts}

    def _chat_stopStream(self, args: dict[str, Any]) -> dict[str, Any]:
        msg = self._streaming(args)
        if isinstance(msg, dict):
            return msg
        msg.text += _chunk_text(args)
        msg.blocks, msg.streaming = args.get("blocks") or [], False
        return {"channel": msg.channel, "ts": msg.ts, "message": msg.payload()}

    def _views_open(self, args: dict[str, Any]) -> dict[str, Any]:
        if not str(args.get("trigger_id", "")).endswith("valid"):
            return {"error": "expired_trigger_id"}
        view = {"id": f"V{len(self.views) + 1}", **args["view"]}
        self.views.append(view)
        return {"view": view}

    def _apps_connections_open(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"url": self.url.replace("http://", "ws://").replace("/api/", "/link")}

    # ---- Socket Mode -------------------------------------------------------------
    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._sockets.append(ws)
        self.changed.set()
        await ws.send_json({"type": "hello", "num_connections": 1,
                            "connection_info": {"app_id": "A111"}})
        async for frame in ws:
            if frame.type == WSMsgType.TEXT:
                data = json.loads(frame.data)
                future = self._acks.pop(data.get("envelope_id", ""), None)
                if future is not None and not future.done():
                    future.set_result(data)
        self._sockets.remove(ws)
        return ws

    async def socket_send(self, kind: str, payload: dict[str, Any], *, envelope_id: str,
                          retry_attempt: int = 0, within: float = 5.0) -> dict[str, Any]:
        """Send an envelope over the Socket Mode link; return the app's acknowledgement."""
        await self.wait_for(lambda: self._sockets)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._acks[envelope_id] = future
        await self._sockets[-1].send_json({
            "envelope_id": envelope_id, "type": kind, "payload": payload,
            "accepts_response_payload": kind != "events_api", "retry_attempt": retry_attempt,
            "retry_reason": "timeout" if retry_attempt else ""})
        return await asyncio.wait_for(future, within)


async def _args(request: web.Request) -> dict[str, Any]:
    """Arguments from the query string, a form body or a JSON body, as slack_sdk sends them."""
    args: dict[str, Any] = dict(request.query)
    if request.can_read_body:
        if request.content_type == "application/json":
            args.update(await request.json())
        else:
            for key, value in (await request.post()).items():
                text = str(value)
                args[key] = json.loads(text) if text[:1] in "[{" else text
    return args


def _chunk_text(args: dict[str, Any]) -> str:
    text = args.get("markdown_text") or ""
    for chunk in args.get("chunks") or []:
        if chunk.get("type") == "markdown_text":
            text += chunk.get("text", "")
    return text
