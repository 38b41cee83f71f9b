"""Slack events end to end: signed requests -> real slack-bolt -> core -> fake Web API."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import select

from storage.models import InboundEvent, Message
from tests.slack.conftest import Gateway, Launch, payload, sign, thread_of
from tests.slack.gateway_proc import scripted


async def test_url_verification_is_answered(gw: Gateway) -> None:
    r = await gw.event(payload("url_verification"))
    assert r.status_code == 200
    assert r.json() == {"challenge": payload("url_verification")["challenge"]}


async def test_bad_signature_is_401_and_nothing_is_processed(gw: Gateway) -> None:
    raw = b'{"type":"event_callback","event_id":"EvBAD","event":{"type":"app_mention"}}'
    headers = {"Content-Type": "application/json",
               **sign(raw, secret="not-the-signing-secret")}
    r = await gw.http.post("/slack/events", content=raw, headers=headers)
    assert r.status_code == 401
    body = payload("app_mention")
    raw = (await _raw(body))
    tampered = sign(raw) | {"X-Slack-Signature": "v0=" + "0" * 64}
    r = await gw.http.post("/slack/events", content=raw,
                           headers={"Content-Type": "application/json", **tampered})
    assert r.status_code == 401
    await _assert_nothing_stored(gw)


async def test_stale_timestamp_is_401(gw: Gateway) -> None:
    raw = await _raw(payload("app_mention"))
    headers = {"Content-Type": "application/json",
               **sign(raw, timestamp=int(time.time()) - 301)}
    r = await gw.http.post("/slack/events", content=raw, headers=headers)
    assert r.status_code == 401
    await _assert_nothing_stored(gw)


async def test_mention_streams_the_answer_into_its_thread(gw: Gateway) -> None:
    body = payload("app_mention")
    started = time.perf_counter()
    r = await gw.event(body)
    assert r.status_code == 200 and time.perf_counter() - started < 1.0
    channel, thread = thread_of(body)
    [answer] = await gw.answered(channel, thread)
    assert answer.text == "Echo: summarize this"  # exact, mention stripped from the question
    assert gw.fake.count("chat.startStream") == 1 and gw.fake.count("chat.stopStream") == 1
    assert gw.fake.count("chat.postMessage") == 0
    start = next(c for c in gw.fake.calls if c.method == "chat.startStream")
    assert start.args["recipient_user_id"] == "U222" and start.args["recipient_team_id"] == "T111"
    buttons = [e["action_id"] for e in answer.feedback["elements"]]
    assert buttons == ["vote_up", "vote_down", "suggest"]
    async with gw.services.sessions() as s:
        stored = (await s.execute(select(Message).where(Message.role == "assistant"))).scalar_one()
    assert stored.text == answer.text and stored.external_message_id == answer.ts


async def test_answer_is_streamed_in_several_appends(launch: Launch, sqlite_url: str) -> None:
    backend = scripted(answer=lambda r: "one two three four five six seven eight nine ten",
                       chunk=4, delay=0.03)
    async with launch(sqlite_url, backend) as gw:
        body = payload("app_mention")
        await gw.event(body)
        [answer] = await gw.answered(*thread_of(body))
    assert answer.text == "one two three four five six seven eight nine ten"
    assert answer.appends >= 2  # visible before the end, not only at stopStream


async def test_acknowledged_before_the_answer_is_generated(launch: Launch,
                                                           sqlite_url: str) -> None:
    async with launch(sqlite_url, scripted(seconds=2.0)) as gw:
        body = payload("app_mention")
        started = time.perf_counter()
        r = await gw.event(body)
        acked = time.perf_counter() - started
        assert r.status_code == 200 and acked < 0.5
        async with gw.services.sessions() as s:  # the inbox record exists at the ack
            event = (await s.execute(select(InboundEvent))).scalar_one()
        assert event.external_event_id == "Ev0001" and event.status == "received"
        await gw.answered(*thread_of(body))


async def test_direct_message_is_answered_in_its_thread(gw: Gateway) -> None:
    body = payload("dm")
    assert (await gw.event(body)).status_code == 200
    [answer] = await gw.answered("D111", body["event"]["ts"])
    assert answer.text == "Echo: hi"


async def test_thread_follow_up_sees_the_earlier_turns(gw: Gateway) -> None:
    first = payload("app_mention", text="<@U0BOT> when are you open?")
    await gw.event(first)
    await gw.answered(*thread_of(first))
    await gw.event(payload("thread_reply"))  # no mention: a follow-up in the bot's thread
    await gw.answered(*thread_of(first), count=2)
    asked = [(m.role, m.content) for m in gw.backend.requests[-1].messages][1:]
    assert asked == [("user", "when are you open?"), ("assistant", "Echo: when are you open?"),
                     ("user", "and what about Tuesdays?")]


async def test_threads_without_the_bot_are_left_alone(gw: Gateway) -> None:
    body = payload("thread_reply", thread_ts="1735680000.000001", event_id="Ev9")
    assert (await gw.event(body)).status_code == 200
    await asyncio.sleep(0.2)
    assert gw.backend.requests == [] and gw.fake.count("chat.startStream") == 0


async def test_own_and_other_bot_messages_and_edits_are_ignored(gw: Gateway) -> None:
    own = payload("bot_message")
    other = payload("dm", subtype="bot_message", bot_id="B999", username="other", user=None)
    other["event_id"] = "Ev0005"
    edit = payload("dm", subtype="message_changed", hidden=True)
    edit["event_id"] = "Ev0006"
    for body in (own, other, edit):
        assert (await gw.event(body)).status_code == 200
    await asyncio.sleep(0.2)
    assert gw.backend.requests == [] and not gw.fake.messages


async def test_retried_event_is_answered_once(launch: Launch, db_url: str) -> None:
    async with launch(db_url, scripted(seconds=0.5)) as gw:
        body = payload("app_mention")
        first, *retries = await asyncio.gather(gw.event(body), gw.event(body, retry=1),
                                               gw.event(body, retry=1))
        assert [r.status_code for r in (first, *retries)] == [200, 200, 200]
        await gw.answered(*thread_of(body))
        assert (await gw.event(body, retry=2)).status_code == 200  # after the answer, too
        await asyncio.sleep(0.3)
        assert len(gw.backend.requests) == 1
        assert len(gw.fake.thread(*thread_of(body))) == 1
        async with gw.services.sessions() as s:
            rows = (await s.execute(select(Message.role).order_by(Message.id))).scalars().all()
        assert rows == ["user", "assistant"]


async def _raw(body: dict) -> bytes:  # type: ignore[type-arg]
    import json

    return json.dumps(body).encode()


async def _assert_nothing_stored(gw: Gateway) -> None:
    await asyncio.sleep(0.1)
    async with gw.services.sessions() as s:
        assert (await s.execute(select(InboundEvent))).first() is None
    assert gw.backend.requests == [] and not gw.fake.messages


async def test_socket_mode_acknowledges_and_answers_once(launch: Launch,
                                                         sqlite_url: str) -> None:
    async with launch(sqlite_url, slack_app_token="xapp-test") as gw:
        assert (await gw.event(payload("app_mention"))).status_code == 404  # no HTTP endpoint
        body = payload("app_mention")
        ack = await gw.fake.socket_send("events_api", body, envelope_id="env-1")
        assert ack == {"envelope_id": "env-1"}
        retry = await gw.fake.socket_send("events_api", body, envelope_id="env-2",
                                          retry_attempt=1)
        assert retry == {"envelope_id": "env-2"}
        [answer] = await gw.answered(*thread_of(body))
        assert answer.text == "Echo: summarize this" and len(gw.backend.requests) == 1
