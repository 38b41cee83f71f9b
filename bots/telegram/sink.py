"""The ReplySink for Telegram: typing, a growing answer, the exact final text with 👍 / 👎.

Private chats stream through `sendMessageDraft` and finish with `sendMessage`; groups get one
message (per 4096-character part) that throttled `editMessageText` calls grow in place. A
per-chat pacer spaces streaming calls, shared by every reply in the chat; the final text is
always delivered (with retries), streaming previews are best effort.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from aiogram.types import InlineKeyboardMarkup

from bots.limits import Buckets, LocalBuckets, wait_for_token
from bots.telegram.convert import vote_keyboard
from bots.telegram.outbound import (
    ChatUnreachable,
    DeliveryError,
    FloodWait,
    Target,
    TelegramApi,
)
from bots.telegram.render import is_plain, split_text

log = logging.getLogger(__name__)

# a send token this task took along with a chat's streaming slot, spent by its next call
_prepaid: ContextVar[bool] = ContextVar("prepaid", default=False)


class Pacer:
    """The bot's send budget (`per_second` messages, bursts of `burst`: Telegram allows about
    30 a second in all, counted on arrival, so this leaves room for network jitter) and one
    streaming call per interval per chat. Token buckets in `buckets`, which replicas share
    through Redis (`bots.limits.shared_buckets`); flood-control holds (a 429's retry_after)
    stay in this process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *,
                 buckets: Buckets | None = None, bot: str = "bot", per_second: float = 20.0,
                 burst: float = 5.0) -> None:
        self._clock = clock
        self._next: dict[int, float] = {}
        self._buckets = buckets or LocalBuckets(clock=clock)
        self._bot, self._per_second, self._burst = bot, per_second, burst
        self._sends = f"tg:{bot}:sends"

    def wait_time(self, chat_id: int) -> float:
        """How long a flood-control hold keeps this chat silent."""
        return max(0.0, self._next.get(chat_id, 0.0) - self._clock())

    async def slot(self, chat_id: int, interval: float) -> float:
        """Take this chat's streaming slot: 0.0, or the seconds until one is free.

        The bot's send token for the call comes first and goes with the slot: Telegram counts
        calls when they arrive, so a slot taken before a wait in the bot's queue would let
        this call land right before the chat's next one."""
        held = self.wait_time(chat_id)
        if held > 0:
            return held
        await self.send()
        wait = await self._buckets.take(f"tg:{self._bot}:chat:{chat_id}", 1.0 / interval, 1.0)
        if wait > 0:
            await self._buckets.give(self._sends, self._per_second, self._burst)
            return wait
        _prepaid.set(True)
        return 0.0

    async def send(self) -> None:
        """Wait for a token of the bot's send budget (every message, edit and draft)."""
        if _prepaid.get():
            _prepaid.set(False)
            return
        await wait_for_token(self._buckets, self._sends, self._per_second, self._burst)

    def hold(self, chat_id: int, seconds: float) -> None:
        """Flood control: no streaming call to this chat for `seconds`."""
        self._next[chat_id] = max(self._next.get(chat_id, 0.0), self._clock() + seconds)


class _Stream:
    """Pushes the newest text, at most once per interval per chat, without blocking the model.

    The first push waits `first_after` seconds: an answer finished by then goes out once, as
    the final message, instead of as a preview and then the final (half the Bot API calls of a
    fast answer; a bot may send only about 30 messages a second in all).
    """

    def __init__(self, push: Callable[[str], Awaitable[None]], pacer: Pacer, chat_id: int,
                 interval: float, first_after: float) -> None:
        self._push, self._pacer, self._chat, self._interval = push, pacer, chat_id, interval
        self._first_after = first_after
        self._latest = ""
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._busy = self._closing = False

    def offer(self, text: str) -> None:
        self._latest = text
        self._dirty.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        await asyncio.sleep(self._first_after)
        while not self._closing:
            await self._dirty.wait()
            wait = await self._pacer.slot(self._chat, self._interval)
            if wait > 0:  # another reply in this chat (on any replica) has the slot
                await asyncio.sleep(wait)
                continue
            self._dirty.clear()
            self._busy = True
            try:
                await self._push(self._latest)
            except FloodWait as exc:
                self._pacer.hold(self._chat, exc.retry_after)
            except ChatUnreachable:
                return
            except Exception as exc:  # a preview is best effort: the final text still follows
                log.info("streaming update to chat %s failed: %s", self._chat, exc)
            finally:
                self._busy = False

    async def close(self) -> None:
        """Stop streaming; a call already on the wire completes so it cannot land later."""
        if self._task is None:
            return
        self._closing = True
        if not self._busy:
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class _Typing:
    """Keeps "typing…" on until the first text shows (Telegram clears it after ~5 s).

    It starts after `after` seconds of silence: a model that answers at once needs none,
    which saves a Bot API call per answer.
    """

    def __init__(self, api: TelegramApi, where: Target, *, after: float = 0.25,
                 every: float = 4.5) -> None:
        self._api, self._where, self._after, self._every = api, where, after, every
        self._task: asyncio.Task[None] | None = None
        self._busy = self._halted = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        await asyncio.sleep(self._after)
        while not self._halted:
            self._busy = True
            try:
                await self._api.typing(self._where)
            except DeliveryError as exc:
                log.info("typing action in chat %s failed: %s", self._where.chat_id, exc)
                return
            finally:
                self._busy = False
            await asyncio.sleep(self._every)

    def halt(self) -> None:
        """Stop; a call on the wire completes (else "typing…" could outlive the answer)."""
        self._halted = True
        if self._task is not None and not self._busy:
            self._task.cancel()

    async def stop(self) -> None:
        self.halt()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class TelegramSink:
    """One reply in one chat (or forum topic)."""

    def __init__(self, api: TelegramApi, where: Target, pacer: Pacer, *,
                 draft_interval: float, edit_interval: float, preview_after: float,
                 showing: int | None = None, human_button: bool = False) -> None:
        self._api, self._where = api, where
        self._human = human_button  # "Talk to a person" under answers (hand-off)
        self._draft_id = random.randint(1, 2**31 - 1)
        # groups: the message showing each part; `showing` is one already on screen (a turn
        # resumed after a crash continues it), and `on_showing` learns of a new one
        self._messages: list[int] = [] if showing is None else [showing]
        self._shown: list[tuple[str, bool, bool]] = [("", False, False)] * len(self._messages)
        self.on_showing: Callable[[int], Awaitable[None]] | None = None
        interval = draft_interval if where.private else edit_interval
        self._stream = _Stream(self._preview, pacer, where.chat_id, interval, preview_after)
        self._typing = _Typing(api, where)
        self.error: str | None = None  # why the final answer was not delivered, if it was not

    async def begin(self) -> None:
        self._typing.start()  # in the background: the model starts at once

    async def update(self, text: str) -> None:
        if text.strip():
            self._typing.halt()
            self._stream.offer(text)

    async def finish(self, text: str, answer_id: int) -> str | None:
        await self._typing.stop()
        await self._stream.close()
        parts = _parts(text)
        keyboard = vote_keyboard(answer_id, human=self._human)
        message_id = None
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                message_id = await self._show(i, part, formatted=True,
                                              keyboard=keyboard if last else None, patient=True)
        except DeliveryError as exc:
            self.error = exc.kind if isinstance(exc, ChatUnreachable) else "undelivered"
            self._undelivered(f"answer {answer_id}", exc)
            return None
        return None if message_id is None else str(message_id)

    async def fail(self, text: str) -> None:
        await self._typing.stop()
        await self._stream.close()
        try:
            if self._messages:
                await self._api.put(self._where, text, edit=self._messages[0], formatted=False)
            else:
                await self._api.send_plain(self._where, text, quote=not self._where.private)
        except DeliveryError as exc:
            self._undelivered("an apology", exc)

    async def notice(self, text: str) -> None:
        try:
            await self._api.send_plain(self._where, text, quote=not self._where.private)
        except DeliveryError as exc:
            self._undelivered("a notice", exc)

    async def _preview(self, text: str) -> None:
        parts = _parts(text)
        if self._where.private:
            await self._api.draft(self._where, self._draft_id, parts[-1])
            return
        for i, part in enumerate(parts):
            first = not self._messages
            await self._show(i, part, formatted=False, keyboard=None, patient=False)
            if first and self.on_showing is not None:
                await self.on_showing(self._messages[0])

    async def _show(self, i: int, text: str, *, formatted: bool,
                    keyboard: InlineKeyboardMarkup | None, patient: bool) -> int:
        """Put part `i` on screen, editing its message if it has one; never an unchanged edit."""
        state = (text, formatted and not is_plain(text), keyboard is not None)
        if i < len(self._messages) and self._shown[i] == state:
            return self._messages[i]
        edit = self._messages[i] if i < len(self._messages) else None
        message_id = await self._api.put(
            self._where, text, keyboard=keyboard, edit=edit, formatted=formatted,
            quote=i == 0 and not self._where.private, patient=patient)
        if edit is None:
            self._messages.append(message_id)
            self._shown.append(state)
        else:
            self._messages[i], self._shown[i] = message_id, state
        return message_id

    def _undelivered(self, what: str, exc: DeliveryError) -> None:
        level = logging.WARNING if isinstance(exc, ChatUnreachable) else logging.ERROR
        log.log(level, "telegram chat %s: %s not delivered: %s", self._where.chat_id, what, exc)


def _parts(text: str) -> list[str]:
    """The messages `text` takes: split at natural boundaries, blank pieces dropped."""
    return [p.strip() for p in split_text(text) if p.strip()]
