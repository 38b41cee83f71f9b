"""Outbound behaviour: rate limits, dying streams, refused channels, failures, limits, safety."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import select

from inference.errors import BackendUnavailable
from storage.models import InboundEvent, Message
from tests.slack.conftest import Launch, payload, thread_of
from tests.slack.gateway_proc import scripted

WORDS = " ".join(f"word{i}" for i in range(60))


async def test_429_on_an_update_is_retried_and_the_final_text_arrives(
        launch: Launch, sqlite_url: str) -> None:
    backend = scripted(answer=lambda r: WORDS, chunk=20, delay=0.02)
    async with launch(sqlite_url, backend, slack_streaming=False) as gw:
        gw.fake.rate_limit("chat.update", times=2, retry_after=0)
        body = payload("app_mention")
        await gw.event(body)
        [answer] = await gw.answered(*thread_of(body))
        assert answer.text == WORDS
        limited = [c for c in gw.fake.calls if c.method == "chat.update" and c.status == 429]
        assert len(limited) == 2
        assert gw.fake.count("chat.postMessage") == 1  # the placeholder, edited in place


async def test_a_dying_stream_falls_back_to_edits_and_the_final_text_arrives(
        launch: Launch, sqlite_url: str) -> None:
    backend = scripted(answer=lambda r: WORDS, chunk=12, delay=0.03)
    async with launch(sqlite_url, backend) as gw:
        gw.fake.kill_streams_after(1)
        body = payload("app_mention")
        await gw.event(body)
        [answer] = await gw.answered(*thread_of(body))
        assert answer.text == WORDS and answer.edits >= 1
        failed = [c.error for c in gw.fake.calls if c.error]
        assert "message_not_in_streaming_state" in failed
        assert len(gw.fake.thread(*thread_of(body))) == 1  # the same message, not a new one


async def test_streaming_unavailable_uses_a_placeholder_and_throttled_edits(
        launch: Launch, sqlite_url: str) -> None:
    backend = scripted(answer=lambda r: WORDS, chunk=2, delay=0.002)
    async with launch(sqlite_url, backend, slack_update_interval_s=0.2) as gw:
        gw.fake.fail("chat.startStream", "unknown_method")
        body = payload("app_mention")
        started = time.monotonic()
        await gw.event(body)
        [answer] = await gw.answered(*thread_of(body))
        took = time.monotonic() - started
        assert answer.text == WORDS and len(gw.backend.requests) == 1
        # ~300 deltas, edits at most every 0.2 s (plus the final one): not hundreds
        assert 2 <= gw.fake.count("chat.update") <= took / 0.2 + 2


async def test_refused_channel_is_recorded_and_not_retried(launch: Launch,
                                                           sqlite_url: str) -> None:
    async with launch(sqlite_url) as gw:
        gw.fake.gone["C111"] = "not_in_channel"
        body = payload("app_mention")
        assert (await gw.event(body)).status_code == 200
        await gw.fake.wait_for(lambda: gw.fake.count("chat.startStream"))
        await gw.idle()
        calls = [c.method for c in gw.fake.calls if c.method != "auth.test"]
        assert calls == ["chat.startStream"]  # refused once: nothing more is tried
        async with gw.services.sessions() as s:
            answer = (await s.execute(select(Message).where(Message.role == "assistant"))
                      ).scalar_one()
            event = (await s.execute(select(InboundEvent))).scalar_one()
        assert answer.error_kind == "slack:not_in_channel" and event.status == "done"


async def test_inference_failure_gives_an_apology_and_a_failed_turn(launch: Launch,
                                                                   sqlite_url: str) -> None:
    backend = scripted(answer=lambda r: WORDS, chunk=8, fail_after=3,
                       error=BackendUnavailable("down"))
    async with launch(sqlite_url, backend) as gw:
        body = payload("app_mention")
        await gw.event(body)
        [msg] = await gw.fake.wait_for(lambda: [m for m in gw.fake.thread(*thread_of(body))
                                                if m.text.startswith("Sorry")])
        await gw.idle()
        assert msg.feedback is None and "unavailable" in msg.text
        async with gw.services.sessions() as s:
            answer = (await s.execute(select(Message).where(Message.role == "assistant"))
                      ).scalar_one()
        assert answer.status == "failed" and answer.error_kind == "unavailable"


async def test_long_answers_are_split_under_slack_limits(launch: Launch,
                                                         sqlite_url: str) -> None:
    long = " ".join(f"w{i:04d}" for i in range(1500))  # 8,999 characters
    backend = scripted(answer=lambda r: long, chunk=400)
    async with launch(sqlite_url, backend) as gw:
        body = payload("app_mention")
        await gw.event(body)
        await gw.answered(*thread_of(body))
        parts = gw.fake.thread(*thread_of(body))
        assert len(parts) == 3 and all(len(m.text) <= 3000 for m in parts)
        assert "".join(m.text for m in parts) == long
        assert [m.feedback is not None for m in parts] == [False, False, True]


async def test_model_output_cannot_ping_or_link(launch: Launch, sqlite_url: str) -> None:
    evil = "Hi <!channel> and @everyone, see <https://evil.example|this> & @here."
    async with launch(sqlite_url, scripted(answer=lambda r: evil, chunk=5)) as gw:
        body = payload("app_mention")
        await gw.event(body)
        [answer] = await gw.answered(*thread_of(body))
    for bad in ("<!channel>", "<https://", "@everyone", "@here"):
        assert bad not in answer.text
    assert answer.text == ("Hi &lt;!channel&gt; and @\u200beveryone, see "
                           "&lt;https://evil.example|this&gt; &amp; @\u200bhere.")


async def test_rate_limited_user_gets_a_notice_without_an_answer(launch: Launch,
                                                                 sqlite_url: str) -> None:
    async with launch(sqlite_url, rate_limit_per_minute=1) as gw:
        await gw.event(payload("dm"))
        await gw.answered("D111", "1735689601.000200")
        second = payload("dm", ts="1735689700.000100", text="again")
        second["event_id"] = "Ev0099"
        await gw.event(second)
        [notice] = await gw.fake.wait_for(lambda: gw.fake.thread("D111", "1735689700.000100"))
        await asyncio.sleep(0.1)
        assert "too quickly" in notice.text and len(gw.backend.requests) == 1
