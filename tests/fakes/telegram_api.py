"""A fake Telegram Bot API server on loopback, for the real aiogram client (PROTOCOLS.md T1-T7).

It keeps chats, messages, drafts and an update queue with getUpdates long-poll and offset
semantics, or pushes updates to a webhook with the secret header (retrying non-2xx), answers
with Telegram's envelopes and error strings, checks HTML formatting and lengths, can inject
faults (flood control, "message is not modified", blocked chats, 5xx, slow answers), and
records every call. In a test: `FakeTelegram()` + `serve_app(fake.app())`. As a process (for
benchmarks): `python -m tests.fakes.telegram_api --port N`, driven through `/_fake/*`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

TOKEN = "123456:TEST-fake-token"
BOT = {"id": 123456, "is_bot": True, "first_name": "TestBot", "username": "test_bot",
       "can_join_groups": True, "can_read_all_group_messages": False}
NOT_MODIFIED = ("Bad Request: message is not modified: specified new message content and reply "
                "markup are exactly the same as a current content and reply markup of the message")
BLOCKED = "Forbidden: bot was blocked by the user"
MIGRATED = "Bad Request: group chat was upgraded to a supergroup chat"
KICKED = "Forbidden: bot was kicked from the group chat"
KICKED_SUPERGROUP = "Forbidden: bot was kicked from the supergroup chat"
THREAD_NOT_FOUND = "Bad Request: message thread not found"
TOPIC_CLOSED = "Bad Request: TOPIC_CLOSED"
NOT_A_FORUM = "Bad Request: the chat is not a forum"
TOPIC_COLORS = (0x6FB9F0, 0xFFD67E, 0xCB86DB, 0x8EEE98, 0xFF93B2, 0xFB6F5F)
_INT = {"chat_id", "message_id", "offset", "limit", "timeout", "draft_id", "message_thread_id",
        "max_connections", "cache_time"}
_JSON = {"reply_markup", "reply_parameters", "allowed_updates", "commands", "entities",
         "link_preview_options", "scope"}
_TAGS = {"b": "bold", "strong": "bold", "i": "italic", "em": "italic", "u": "underline",
         "ins": "underline", "s": "strikethrough", "strike": "strikethrough",
         "del": "strikethrough", "code": "code", "pre": "pre", "a": "text_link",
         "tg-spoiler": "spoiler", "blockquote": "blockquote"}
_TOKEN = re.compile(r"<(/?)([a-zA-Z][\w-]*)([^<>]*)>|&(lt|gt|amp|quot|#\d+|#x[\da-fA-F]+);|[<&]")


class ApiError(Exception):
    def __init__(self, code: int, description: str, retry_after: int | None = None,
                 migrate_to_chat_id: int | None = None) -> None:
        super().__init__(description)
        self.code, self.description, self.retry_after = code, description, retry_after
        self.migrate_to_chat_id = migrate_to_chat_id


class _Raw(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(body)
        self.status, self.body = status, body


def u16(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def parse_html(source: str) -> tuple[str, list[dict[str, Any]]]:
    """Telegram's HTML parse mode: (plain text, entities) or ApiError like the real server."""
    out, entities, stack, pos = "", [], [], 0
    for m in _TOKEN.finditer(source):
        out += source[pos:m.start()]
        pos = m.end()
        at = len(source[:m.start()].encode())
        if m.group(4):
            name = m.group(4)
            out += {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}.get(name) or chr(
                int(name[2:], 16) if name.startswith("#x") else int(name[1:]))
        elif m.group(2) is None:
            raise ApiError(400, "Bad Request: can't parse entities: Unsupported start tag "
                                f"at byte offset {at}")
        elif m.group(1):
            if not stack or stack[-1][0] != m.group(2).lower():
                raise ApiError(400, "Bad Request: can't parse entities: Can't find end tag "
                                    f"corresponding to start tag at byte offset {at}")
            tag, attrs, start = stack.pop()
            entity = {"type": _TAGS[tag], "offset": start, "length": u16(out) - start}
            if tag == "a":
                entity["url"] = re.search(r'href="([^"]*)"', attrs).group(1)  # type: ignore[union-attr]
            if entity["length"]:
                entities.append(entity)
        else:
            tag = m.group(2).lower()
            if tag not in _TAGS or (tag == "a" and 'href="' not in m.group(3)):
                raise ApiError(400, f'Bad Request: can\'t parse entities: Unsupported start tag '
                                    f'"{tag}" at byte offset {at}')
            stack.append((tag, m.group(3), u16(out)))
    if stack:
        raise ApiError(400, "Bad Request: can't parse entities: Can't find end tag corresponding "
                            f'to start tag "{stack[-1][0]}"')
    out += source[pos:]
    return out, sorted(entities, key=lambda e: e["offset"])


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    at: float
    status: int = 200


@dataclass
class Fault:
    method: str
    code: int | None
    description: str
    retry_after: int | None = None
    times: int = 1
    delay: float = 0.0
    when: Callable[[dict[str, Any]], bool] | None = None
    raw: str | None = None  # answer this non-JSON body instead (a proxy's error page)


@dataclass
class Load:
    """Closed-loop simulated users: each sends its next message when its answer arrives."""

    left: dict[int, int] = field(default_factory=dict)


class FakeTelegram:
    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.calls: list[Call] = []
        self.updates: list[dict[str, Any]] = []  # not yet confirmed
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}
        self.chats: dict[int, dict[str, Any]] = {}
        self.blocked: set[int] = set()
        self.migrated: dict[int, int] = {}  # a group upgraded to a supergroup: old id -> new
        self.drafts: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        self.webhook: dict[str, Any] | None = None
        self.webhook_statuses: list[int] = []
        # Telegram retries a webhook delivery answered non-2xx, backing off; it gives up after
        # "a reasonable amount of attempts" (a fault test raises these to outlast an outage)
        self.webhook_attempts, self.webhook_retry_s = 5, 0.2
        self.commands: list[dict[str, Any]] = []
        self.answered_callbacks: dict[str, str | None] = {}
        # forum topics (T8): chat id -> thread id -> {"name", "icon_color", "closed"}
        self.topics: dict[int, dict[int, dict[str, Any]]] = {}
        self.deleted_topics: set[tuple[int, int]] = set()
        self.latencies: list[float] = []
        self.finals: Counter[int] = Counter()
        self.load = Load()
        self.on_confirm: Callable[[list[int]], Awaitable[None]] | None = None  # test hook
        self._update_ids = itertools.count(10001)
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._callbacks: set[str] = set()
        self._asked: dict[int, deque[float]] = {}
        self._finalised: set[tuple[int, int]] = set()
        self._arrived = asyncio.Event()
        self._poller = 0
        self._outbox: asyncio.Queue[dict[str, Any]] | None = None
        self._workers: list[asyncio.Task[None]] = []

    # ---- the user side: chats, messages, button presses ------------------------------------
    def private(self, user_id: int = 42, name: str = "Ann") -> dict[str, Any]:
        chat = {"id": user_id, "type": "private", "first_name": name}
        self.chats[user_id] = chat
        return chat

    def group(self, chat_id: int = -1001234567890, *, forum: bool = False) -> dict[str, Any]:
        chat = {"id": chat_id, "type": "supergroup", "title": "Team", "is_forum": forum}
        self.chats[chat_id] = chat
        return chat

    def upgrade(self, group: dict[str, Any], new_id: int) -> dict[str, Any]:
        """The group becomes a supergroup with a new id; its old id is refused from now on."""
        self.migrated[group["id"]] = new_id
        return self.group(new_id)

    @staticmethod
    def user(user_id: int = 42, name: str = "Ann", *, bot: bool = False) -> dict[str, Any]:
        return {"id": user_id, "is_bot": bot, "first_name": name}

    def say(self, chat: dict[str, Any], text: str | None, *, user: dict[str, Any] | None = None,
            reply_to: dict[str, Any] | None = None, thread: int | None = None,
            entities: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
        """A person posts a message; returns the queued (or pushed) update."""
        msg = self._new_message(chat, user or self.user(chat["id"] if chat["id"] > 0 else 43),
                                thread=thread, reply_to=reply_to)
        if text is not None:
            msg["text"] = text
        if entities is None and text and text.startswith("/"):
            entities = [{"type": "bot_command", "offset": 0, "length": u16(text.split()[0])}]
        if entities:
            msg["entities"] = entities
        msg.update(extra)
        self._asked.setdefault(chat["id"], deque()).append(time.perf_counter())
        return self.push({"message": msg})

    def mention(self, chat: dict[str, Any], text: str, **kw: Any) -> dict[str, Any]:
        """`@test_bot <text>` with a mention entity, as Telegram sends it."""
        full = f"@{BOT['username']} {text}"
        entity = {"type": "mention", "offset": 0, "length": u16(BOT["username"]) + 1}
        return self.say(chat, full, entities=[entity], **kw)

    def edit(self, message: dict[str, Any], text: str) -> dict[str, Any]:
        edited = {**message, "text": text, "edit_date": int(time.time())}
        return self.push({"edited_message": edited})

    def press(self, message: dict[str, Any], data: str, *,
              user: dict[str, Any] | None = None) -> dict[str, Any]:
        query_id = uuid.uuid4().hex[:18]
        self._callbacks.add(query_id)
        who = user or self.user(message["chat"]["id"] if message["chat"]["id"] > 0 else 43)
        query = {"id": query_id, "chat_instance": "-7391826417264811", "from": who,
                 "data": data, "message": message}
        return self.push({"callback_query": query})

    def push(self, body: dict[str, Any]) -> dict[str, Any]:
        update = {"update_id": next(self._update_ids), **body}
        if self.webhook is not None and self._outbox is not None:
            self._outbox.put_nowait(update)
        else:
            self.updates.append(update)
            self._arrived.set()
        return update

    # ---- what the bot did ----------------------------------------------------------------------
    def sent(self, chat_id: int, thread: int | None = None) -> list[dict[str, Any]]:
        """The bot's messages in a chat (current state, after edits), oldest first."""
        return [m for (c, _), m in sorted(self.messages.items()) if c == chat_id
                and m["from"]["id"] == BOT["id"] and (thread is None
                                                      or m.get("message_thread_id") == thread)]

    def answers(self, chat_id: int, thread: int | None = None) -> list[dict[str, Any]]:
        """The bot's messages that carry a 👍 / 👎 keyboard (final answers)."""
        return [m for m in self.sent(chat_id, thread) if "reply_markup" in m]

    def calls_to(self, *methods: str) -> list[Call]:
        return [c for c in self.calls if c.method in methods]

    # ---- faults ----------------------------------------------------------------------------------
    def fail(self, method: str, code: int, description: str, *, retry_after: int | None = None,
             times: int = 1, when: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.faults.append(Fault(method, code, description, retry_after, times, when=when))

    def flood(self, method: str, retry_after: int = 1, **kw: Any) -> None:
        self.fail(method, 429, f"Too Many Requests: retry after {retry_after}",
                  retry_after=retry_after, **kw)

    def garble(self, method: str, status: int = 502, body: str = "<html>Bad Gateway</html>",
               times: int = 1) -> None:
        self.faults.append(Fault(method, status, "", times=times, raw=body))

    def slow(self, method: str, seconds: float, times: int = 1,
             when: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.faults.append(Fault(method, None, "", times=times, delay=seconds, when=when))

    # ---- HTTP ------------------------------------------------------------------------------------
    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/bot{token}/{method}", self._endpoint, methods=["POST", "GET"]),
            Route("/_fake/load", self._load, methods=["POST"]),
            Route("/_fake/stats", self._stats, methods=["GET"]),
        ], lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: Starlette) -> AsyncIterator[None]:
        yield
        await self.aclose()

    def release_pollers(self) -> None:
        """Answer a held getUpdates now, so a server shutting down need not wait for it."""
        self._poller += 1
        self._arrived.set()

    async def aclose(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def _endpoint(self, request: Request) -> Response:
        method = request.path_params["method"]
        params = await _params(request)
        call = Call(method, params, time.perf_counter())
        self.calls.append(call)
        try:
            if request.path_params["token"] != self.token:
                raise ApiError(401, "Unauthorized")
            handler = getattr(self, f"_m_{method.lower()}", None)
            if handler is None:
                raise ApiError(404, "Not Found")
            await self._inject(method, params)
            result = await handler(params)
        except _Raw as raw:
            call.status = raw.status
            return PlainTextResponse(raw.body, status_code=raw.status)
        except ApiError as exc:
            call.status = exc.code
            body: dict[str, Any] = {"ok": False, "error_code": exc.code,
                                    "description": exc.description}
            if exc.retry_after is not None:
                body["parameters"] = {"retry_after": exc.retry_after}
            if exc.migrate_to_chat_id is not None:
                body["parameters"] = {"migrate_to_chat_id": exc.migrate_to_chat_id}
            return JSONResponse(body, status_code=exc.code)
        return JSONResponse({"ok": True, "result": result})

    async def _inject(self, method: str, params: dict[str, Any]) -> None:
        for fault in self.faults:
            if fault.method == method and fault.times > 0 and (fault.when is None
                                                               or fault.when(params)):
                fault.times -= 1
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                if fault.raw is not None:
                    raise _Raw(fault.code or 502, fault.raw)
                if fault.code is not None:
                    raise ApiError(fault.code, fault.description, fault.retry_after)
                return

    # ---- methods ---------------------------------------------------------------------------------
    async def _m_getme(self, p: dict[str, Any]) -> Any:
        return BOT

    async def _m_getupdates(self, p: dict[str, Any]) -> Any:
        if self.webhook is not None:
            raise ApiError(409, "Conflict: can't use getUpdates method while webhook is active; "
                                "use deleteWebhook to delete the webhook first")
        self._poller += 1
        me = self._poller
        if (offset := p.get("offset")) is not None and offset > 0:
            confirmed = [u["update_id"] for u in self.updates if u["update_id"] < offset]
            if confirmed and self.on_confirm is not None:
                await self.on_confirm(confirmed)
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
        deadline = time.monotonic() + float(p.get("timeout") or 0)
        while not self.updates and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
            if self._poller != me:
                raise ApiError(409, "Conflict: terminated by other getUpdates request; make sure "
                                    "that only one bot instance is running")
        return self.updates[: int(p.get("limit") or 100)]

    async def _m_setwebhook(self, p: dict[str, Any]) -> Any:
        self.webhook = {"url": p["url"], "secret": p.get("secret_token"),
                        "max_connections": p.get("max_connections") or 40}
        if self._outbox is None:
            self._outbox = asyncio.Queue()
            for update in self.updates:
                self._outbox.put_nowait(update)
            self.updates = []
            self._workers = [asyncio.create_task(self._deliver_forever())
                             for _ in range(self.webhook["max_connections"])]
        return True

    async def _m_deletewebhook(self, p: dict[str, Any]) -> Any:
        self.webhook = None
        if p.get("drop_pending_updates") == "true":
            self.updates = []
        return True

    async def _m_setmycommands(self, p: dict[str, Any]) -> Any:
        self.commands = p["commands"]
        return True

    async def _m_sendchataction(self, p: dict[str, Any]) -> Any:
        self._chat(p)
        return True

    async def _m_sendmessagedraft(self, p: dict[str, Any]) -> Any:
        chat = self._chat(p)
        if chat["type"] != "private" or not p.get("draft_id"):
            raise ApiError(400, "Bad Request: draft can't be sent to this chat")
        text, _ = self._text(p, allow_empty=True)
        self.drafts.append({"chat_id": chat["id"], "draft_id": p["draft_id"], "text": text,
                            "thread": p.get("message_thread_id"), "at": time.perf_counter()})
        return True

    async def _m_sendmessage(self, p: dict[str, Any]) -> Any:
        chat = self._chat(p)
        if chat.get("is_forum") and p.get("message_thread_id"):
            # topics the fake did not create (a test's thread ids) are taken as existing
            if (chat["id"], p["message_thread_id"]) in self.deleted_topics:
                raise ApiError(400, THREAD_NOT_FOUND)
            if self.topics.get(chat["id"], {}).get(p["message_thread_id"], {}).get("closed"):
                raise ApiError(400, TOPIC_CLOSED)
        text, entities = self._text(p)
        reply = (p.get("reply_parameters") or {}).get("message_id")
        replied = self.messages.get((chat["id"], reply)) if reply else None
        msg = self._new_message(chat, BOT, thread=p.get("message_thread_id"), reply_to=replied)
        msg["text"] = text
        self._decorate(msg, entities, p.get("reply_markup"))
        return msg

    async def _m_editmessagetext(self, p: dict[str, Any]) -> Any:
        msg = self._editable(p)
        text, entities = self._text(p)
        if (msg["text"], msg.get("entities"), msg.get("reply_markup")) == (
                text, entities or None, p.get("reply_markup")):
            raise ApiError(400, NOT_MODIFIED)
        msg["text"] = text
        msg.pop("entities", None)
        msg.pop("reply_markup", None)
        self._decorate(msg, entities, p.get("reply_markup"))
        return msg

    async def _m_editmessagereplymarkup(self, p: dict[str, Any]) -> Any:
        msg = self._editable(p)
        if msg.get("reply_markup") == p.get("reply_markup"):
            raise ApiError(400, NOT_MODIFIED)
        msg.pop("reply_markup", None)
        self._decorate(msg, msg.get("entities"), p.get("reply_markup"))
        return msg

    async def _m_deletemessage(self, p: dict[str, Any]) -> Any:
        if self.messages.pop((self._chat(p)["id"], p["message_id"]), None) is None:
            raise ApiError(400, "Bad Request: message to delete not found")
        return True

    async def _m_createforumtopic(self, p: dict[str, Any]) -> Any:
        chat = self._chat(p)
        if chat["type"] != "supergroup" or not chat.get("is_forum"):
            raise ApiError(400, NOT_A_FORUM)
        name = p.get("name") or ""
        if not 1 <= len(name) <= 128:
            raise ApiError(400, "Bad Request: TOPIC_NAME_INVALID")
        color = int(p.get("icon_color") or TOPIC_COLORS[0])
        if color not in TOPIC_COLORS:
            raise ApiError(400, "Bad Request: TOPIC_ICON_COLOR_INVALID")
        service = self._new_message(chat, BOT, thread=None, reply_to=None)
        thread = service["message_id"]  # as in Telegram: the topic's id is its first message's
        service.update(message_thread_id=thread, is_topic_message=True,
                       forum_topic_created={"name": name, "icon_color": color})
        self.topics.setdefault(chat["id"], {})[thread] = {"name": name, "icon_color": color,
                                                          "closed": False}
        return {"message_thread_id": thread, "name": name, "icon_color": color}

    async def _m_closeforumtopic(self, p: dict[str, Any]) -> Any:
        self._topic(self._chat(p), p.get("message_thread_id"))["closed"] = True
        return True

    async def _m_reopenforumtopic(self, p: dict[str, Any]) -> Any:
        self._topic(self._chat(p), p.get("message_thread_id"))["closed"] = False
        return True

    async def _m_deleteforumtopic(self, p: dict[str, Any]) -> Any:
        chat = self._chat(p)
        self._topic(chat, p.get("message_thread_id"))
        self.delete_topic(chat["id"], p["message_thread_id"])
        return True

    def delete_topic(self, chat_id: int, thread: int) -> None:
        """An admin deletes a topic: it and its messages are gone."""
        self.topics.get(chat_id, {}).pop(thread, None)
        self.deleted_topics.add((chat_id, thread))
        for key in [k for k, m in self.messages.items()
                    if k[0] == chat_id and m.get("message_thread_id") == thread]:
            del self.messages[key]

    def _topic(self, chat: dict[str, Any], thread: Any) -> dict[str, Any]:
        topic = self.topics.get(chat["id"], {}).get(thread)
        if topic is None:
            raise ApiError(400, THREAD_NOT_FOUND)
        return topic

    async def _m_answercallbackquery(self, p: dict[str, Any]) -> Any:
        query_id = p["callback_query_id"]
        if query_id not in self._callbacks or query_id in self.answered_callbacks:
            raise ApiError(400, "Bad Request: query is too old and response timeout expired or "
                                "query ID is invalid")
        self.answered_callbacks[query_id] = p.get("text")
        return True

    # ---- helpers ---------------------------------------------------------------------------------
    def _chat(self, p: dict[str, Any]) -> dict[str, Any]:
        chat = self.chats.get(p.get("chat_id"))  # type: ignore[arg-type]
        if chat is None:
            raise ApiError(400, "Bad Request: chat not found")
        if chat["id"] in self.migrated:
            raise ApiError(400, MIGRATED, migrate_to_chat_id=self.migrated[chat["id"]])
        if chat["id"] in self.blocked:
            raise ApiError(403, BLOCKED if chat["type"] == "private" else
                           KICKED_SUPERGROUP if chat["type"] == "supergroup" else KICKED)
        return chat

    def _editable(self, p: dict[str, Any]) -> dict[str, Any]:
        msg = self.messages.get((self._chat(p)["id"], p.get("message_id")))  # type: ignore[arg-type]
        if msg is None or msg["from"]["id"] != BOT["id"]:
            raise ApiError(400, "Bad Request: message to edit not found")
        return msg

    @staticmethod
    def _text(p: dict[str, Any], *, allow_empty: bool = False) -> tuple[str, list[Any]]:
        raw = p.get("text") or ""
        if p.get("parse_mode") == "HTML":
            text, entities = parse_html(raw)
        elif p.get("parse_mode"):
            raise ApiError(400, f"Bad Request: unsupported parse_mode {p['parse_mode']}")
        else:
            text, entities = raw, p.get("entities") or []
        if not text.strip() and not allow_empty:
            raise ApiError(400, "Bad Request: message text is empty")
        if u16(text) > 4096:
            raise ApiError(400, "Bad Request: message is too long")
        return text, entities

    def _new_message(self, chat: dict[str, Any], sender: dict[str, Any], *, thread: int | None,
                     reply_to: dict[str, Any] | None) -> dict[str, Any]:
        ids = self._message_ids.setdefault(chat["id"], itertools.count(1))
        msg: dict[str, Any] = {"message_id": next(ids), "date": int(time.time()), "chat": chat,
                               "from": sender}
        if thread is not None:
            msg["message_thread_id"], msg["is_topic_message"] = thread, True
        if reply_to is not None:
            msg["reply_to_message"] = {k: v for k, v in reply_to.items()
                                       if k != "reply_to_message"}
        self.messages[(chat["id"], msg["message_id"])] = msg
        return msg

    def _decorate(self, msg: dict[str, Any], entities: list[Any] | None, markup: Any) -> None:
        if entities:
            msg["entities"] = entities
        if markup:
            msg["reply_markup"] = markup
        key = (msg["chat"]["id"], msg["message_id"])
        if markup and "inline_keyboard" in markup and key not in self._finalised:
            self._finalised.add(key)
            self._answered(msg["chat"]["id"])

    def _answered(self, chat_id: int) -> None:
        self.finals[chat_id] += 1
        asked = self._asked.get(chat_id)
        if asked:
            self.latencies.append(time.perf_counter() - asked.popleft())
        if self.load.left.get(chat_id, 0) > 0:
            self.load.left[chat_id] -= 1
            self.say(self.chats[chat_id], f"question {self.load.left[chat_id]} from {chat_id}")

    async def _deliver_forever(self) -> None:
        """Telegram's side of a webhook: POST each update, again after a non-2xx answer."""
        assert self._outbox is not None
        async with httpx.AsyncClient(timeout=60) as client:
            while True:
                update = await self._outbox.get()
                for _attempt in range(self.webhook_attempts):
                    if self.webhook is None:
                        break
                    headers = ({"X-Telegram-Bot-Api-Secret-Token": self.webhook["secret"]}
                               if self.webhook["secret"] else {})
                    try:
                        r = await client.post(self.webhook["url"], json=update, headers=headers)
                        status = r.status_code
                    except httpx.HTTPError:
                        status = 0
                    self.webhook_statuses.append(status)
                    if 200 <= status < 300:
                        break
                    await asyncio.sleep(self.webhook_retry_s)

    # ---- control API for a fake in another process (benchmarks) ---------------------------------
    async def _load(self, request: Request) -> JSONResponse:
        body = await request.json()
        first = body.get("first_chat", 10_000)
        chats = [self.private(first + i, f"user{i}") for i in range(body["users"])]
        for chat in chats:
            self.load.left[chat["id"]] = body["per_user"] - 1
        for chat in chats:
            self.say(chat, f"question {body['per_user'] - 1} from {chat['id']}")
        return JSONResponse({"users": len(chats)})

    async def _stats(self, request: Request) -> JSONResponse:
        if "brief" in request.query_params:  # polled while a benchmark runs: keep it cheap
            return JSONResponse({"answered": sum(self.finals.values())})
        methods = Counter(c.method for c in self.calls)
        return JSONResponse({"methods": dict(methods), "finals": dict(self.finals),
                             "latencies": self.latencies,
                             "asked": sum(len(q) for q in self._asked.values()),
                             "webhook_statuses": dict(Counter(self.webhook_statuses))})


async def _params(request: Request) -> dict[str, Any]:
    body = await request.body()
    if request.headers.get("content-type", "").startswith("application/json"):
        raw: dict[str, Any] = json.loads(body or b"{}")
    else:
        raw = dict(parse_qsl(body.decode(), keep_blank_values=True))
    raw.update(request.query_params)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, str) and key in _JSON:
            value = json.loads(value)
        elif isinstance(value, str) and key in _INT and re.fullmatch(r"-?\d+", value):
            value = int(value)
        out[key] = value
    return out


if __name__ == "__main__":
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    uvicorn.run(FakeTelegram().app(), host="127.0.0.1", port=args.port, log_level="warning")
