"""The Slack ReplySink: a streamed answer in a thread, within Slack's rate limits.

Progress goes out from a pump task, so a slow or rate-limited Web API never stalls
generation: `update` only records the latest text. The answer is streamed with
chat.startStream / appendStream / stopStream; if streaming is unavailable or the stream
dies, the same message is edited with throttled chat.update. Long answers continue in
further messages. The final text is exact (made safe for mrkdwn) and carries the
feedback buttons.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from bots.slack.api import MessageGone, SlackApi, SlackError, Undeliverable
from bots.slack.pacing import Pacing
from bots.slack.render import (
    PLACEHOLDER,
    feedback_block,
    safe_text,
    split_text,
    stable_prefix,
    text_block,
)

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, Any]], None]


@dataclass(frozen=True, slots=True)
class Target:
    channel: str
    thread_ts: str
    user_id: str | None
    team_id: str | None


@dataclass
class _Message:
    ts: str
    streaming: bool  # an open chat stream; otherwise edited with chat.update
    sent: str = ""  # safe text appended to the stream so far
    closed: bool = False


@dataclass
class SlackSink:
    """One answer in one Slack thread; `error` says why delivery stopped, if it did."""

    api: SlackApi
    target: Target
    pacing: Pacing
    spawn: Spawn
    error: str | None = None
    human_button: bool = False  # "Talk to a person" under the answer (hand-off)
    _messages: list[_Message] = field(default_factory=list)
    _latest: str = ""
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    _pump: asyncio.Task[None] | None = None
    _no_stream: bool = False

    async def begin(self) -> None:
        await self._guard(self._open, final=False)

    async def update(self, text: str) -> None:
        self._latest = text
        if self._pump is None:
            self._pump = asyncio.create_task(self._run_pump())
        self._wake.set()

    async def finish(self, text: str, answer_id: int) -> str | None:
        await self._stop_pump()
        await self._guard(lambda: self._render(text, answer_id), final=True)
        done = [m for m in self._messages if m.closed]
        return done[-1].ts if done and self.error is None else None

    async def fail(self, text: str) -> None:
        await self._stop_pump()
        await self._guard(lambda: self._replace(text), final=True)

    async def notice(self, text: str) -> None:
        t = self.target  # posted in the background: a notice never delays the acknowledgement
        self.spawn(self._guard(lambda: self.api.post(channel=t.channel, thread_ts=t.thread_ts,
                                                     text=safe_text(text)), final=True))

    async def _guard(self, step: Callable[[], Awaitable[Any]], *, final: bool) -> None:
        if self.error is not None:
            return
        try:
            await step()
        except Undeliverable as exc:  # nothing more can be shown here: stop, do not retry
            log.warning("slack: cannot reply in %s: %s", self.target.channel, exc.code)
            self.error = exc.code
        except SlackError as exc:
            log.warning("slack: %s failed in %s: %s", exc.method, self.target.channel, exc.code)
            if final:
                self.error = exc.code

    async def _run_pump(self) -> None:
        last = 0.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            delay = last + self.pacing.interval_s - time.monotonic()
            if delay > 0 and await self._closed_within(delay):
                return
            if self._closing.is_set() or not await self.pacing.edits.take(self._closing):
                return
            await self._guard(lambda: self._render(self._latest, None, final=False), final=False)
            last = time.monotonic()

    async def _closed_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
            return True
        except TimeoutError:
            return False

    async def _stop_pump(self) -> None:
        self._closing.set()
        self._wake.set()
        if self._pump is not None:
            await self._pump

    async def _render(self, text: str, answer_id: int | None, *, final: bool = True) -> None:
        parts = split_text(text, self.pacing.message_chars)
        for i, part in enumerate(parts):
            if i < len(self._messages) and self._messages[i].closed:
                continue
            if i >= len(self._messages):
                await self._open()
            last = i == len(parts) - 1
            if last and not final:
                await self._progress(self._messages[i], part)
            else:
                buttons = (feedback_block(answer_id, human=self.human_button)
                           if last and answer_id is not None else None)
                await self._close(self._messages[i], part, buttons)

    async def _open(self) -> None:
        t = self.target
        if self.pacing.streaming and not self._no_stream:
            try:
                ts = await self.api.start_stream(channel=t.channel, thread_ts=t.thread_ts,
                                                 team_id=t.team_id, user_id=t.user_id)
                self._messages.append(_Message(ts, streaming=True))
                return
            except Undeliverable:
                raise
            except SlackError as exc:
                log.info("slack: streaming unavailable (%s); editing messages instead", exc.code)
                self._no_stream = True
        ts = await self.api.post(channel=t.channel, thread_ts=t.thread_ts, text=PLACEHOLDER,
                                 blocks=[text_block(PLACEHOLDER)])
        self._messages.append(_Message(ts, streaming=False))

    async def _progress(self, msg: _Message, part: str) -> None:
        if msg.streaming:
            chunk = safe_text(stable_prefix(part))[len(msg.sent):]
            if not chunk:
                return
            if await self._stream(msg, lambda: self.api.append_stream(
                    channel=self.target.channel, ts=msg.ts, markdown_text=chunk)):
                msg.sent += chunk
                return
        shown = safe_text(part)
        try:
            await self.api.update(channel=self.target.channel, ts=msg.ts, text=shown,
                                  blocks=[text_block(shown)])
        except MessageGone:
            pass  # the final edit posts a new message

    async def _close(self, msg: _Message, part: str, buttons: dict[str, Any] | None) -> None:
        shown = safe_text(part)
        if msg.streaming and shown.startswith(msg.sent):
            rest = shown[len(msg.sent):]
            if await self._stream(msg, lambda: self.api.stop_stream(
                    channel=self.target.channel, ts=msg.ts, markdown_text=rest,
                    blocks=[buttons] if buttons else None)):
                msg.sent, msg.closed = shown, True
                return
        elif msg.streaming:  # cannot happen (append-only text); end the stream, then edit
            await self._stream(msg, lambda: self.api.stop_stream(
                channel=self.target.channel, ts=msg.ts, markdown_text=None, blocks=None))
        await self._edit(msg, shown, [text_block(shown), *([buttons] if buttons else [])])

    async def _stream(self, msg: _Message, call: Callable[[], Awaitable[None]]) -> bool:
        """Run a stream call; on failure (the stream died) switch this message to edits."""
        try:
            await call()
            return True
        except Undeliverable:
            raise
        except SlackError as exc:
            log.info("slack: stream %s ended (%s); falling back to chat.update", msg.ts, exc.code)
            msg.streaming, self._no_stream = False, True
            return False

    async def _edit(self, msg: _Message, text: str, blocks: list[dict[str, Any]]) -> None:
        try:
            await self.api.update(channel=self.target.channel, ts=msg.ts, text=text,
                                  blocks=blocks)
        except MessageGone:  # deleted meanwhile: the final text still has to arrive
            msg.ts = await self.api.post(channel=self.target.channel,
                                         thread_ts=self.target.thread_ts, text=text,
                                         blocks=blocks)
        msg.closed = True

    async def _replace(self, apology: str) -> None:
        current = next((m for m in self._messages if not m.closed), None)
        if current is None:
            await self.api.post(channel=self.target.channel, thread_ts=self.target.thread_ts,
                                text=apology)
            return
        if current.streaming:
            await self._stream(current, lambda: self.api.stop_stream(
                channel=self.target.channel, ts=current.ts, markdown_text=None, blocks=None))
        await self._edit(current, apology, [text_block(apology)])
