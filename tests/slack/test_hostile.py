"""Hostile requests and hostile model output on Slack: verified before parsed, never a 500,
never the body in the log; nothing the model writes becomes a link, a ping or a mention."""

from __future__ import annotations

import json
import logging
import re

import pytest
from sqlalchemy import select

from storage.models import Message
from tests.slack.conftest import Gateway, Launch, payload, sign, thread_of
from tests.slack.gateway_proc import scripted

SECRET_WORDS = "confidential-body-words"


@pytest.mark.parametrize(("body", "content_type"), [
    (b"{", "application/json"),
    (b"\xff\xfe{\"x\": 1}", "application/json"),
    (b"payload=%7B", "application/x-www-form-urlencoded"),
    (json.dumps({"text": SECRET_WORDS}).encode(), "application/json"),
])
async def test_unsigned_requests_get_401_and_one_line_without_the_body(
        gw: Gateway, caplog: pytest.LogCaptureFixture, body: bytes, content_type: str) -> None:
    with caplog.at_level(logging.DEBUG):
        for headers in ({}, {"X-Slack-Request-Timestamp": "soon", "X-Slack-Signature": "v0=0"},
                        sign(body, secret="not-the-secret")):
            r = await gw.http.post("/slack/events", content=body,
                                   headers={"Content-Type": content_type, **headers})
            assert r.status_code == 401
    refusals = [rec for rec in caplog.records if "refused" in rec.getMessage()]
    assert len(refusals) == 3
    for record in caplog.records:  # bolt's own "Invalid request signature" line quotes it all
        text = record.getMessage() + (record.exc_text or "")
        assert SECRET_WORDS not in text and "Traceback" not in text
        assert "body:" not in text


@pytest.mark.parametrize(("body", "content_type"), [
    (b"{", "application/json"),
    (b"\xff\xfe{\"x\": 1}", "application/json"),
    (b"payload=%7B", "application/x-www-form-urlencoded"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json"),
    (b"[1, 2]", "application/json"),
])
async def test_signed_but_malformed_bodies_get_400_not_500(gw: Gateway, body: bytes,
                                                            content_type: str) -> None:
    r = await gw.http.post("/slack/events", content=body,
                           headers={"Content-Type": content_type, **sign(body)})
    assert r.status_code == 400


async def test_bodies_over_the_cap_get_413(gw: Gateway) -> None:
    body = json.dumps(payload("app_mention", text="x" * (1024 * 1024))).encode()
    r = await gw.http.post("/slack/events", content=body,
                           headers={"Content-Type": "application/json", **sign(body)})
    assert r.status_code == 413


async def test_nul_and_lone_surrogates_are_stored_cleaned(launch: Launch, db_url: str) -> None:
    body = payload("app_mention", text="<@U0BOT> hi\u0000 there \ud800!")
    async with launch(db_url) as gw:
        r = await gw.event(body)  # json.dumps writes the lone surrogate as \\ud800, as JSON may
        assert r.status_code == 200
        [answer] = await gw.answered(*thread_of(body))
        async with gw.services.sessions() as s:
            texts = (await s.execute(select(Message.text).order_by(Message.id))).scalars().all()
    assert texts == ["hi there \ufffd!", "Echo: hi there \ufffd!"]
    assert answer.text == "Echo: hi there \ufffd!"


HOSTILE = ("Read [the docs](https://evil.example/login) and ![x](https://evil.example/t.png), "
           "or [this][1].\n\n[1]: https://evil.example/ref\n"
           "<https://evil.example|click> <https://evil.example> <@U0ADMIN> <!channel> "
           "<!subteam^S1> @here @channel @everyone done.")


def live_parts(markdown: str) -> list[str]:
    """What Slack would turn into a link, a ping or a mention, in a markdown block or in
    mrkdwn text: Markdown link syntax, Slack's <...> controls, broadcast words."""
    found = re.findall(r"\]\(|\]\[|\]:", markdown)  # [label](url), [label][ref], [ref]: url
    found += re.findall(r"<[^>]*>", markdown)  # <url|label>, <@U…>, <!channel>, <url>
    found += re.findall(r"@(?:here|channel|everyone)\b", markdown)
    return found


async def test_model_output_cannot_link_ping_or_mention(launch: Launch,
                                                        sqlite_url: str) -> None:
    assert len(live_parts(HOSTILE)) == 12  # what an unguarded sink would have sent
    for streaming in (True, False):
        backend = scripted(answer=lambda r: HOSTILE, chunk=7)
        async with launch(sqlite_url, backend, slack_streaming=streaming) as gw:
            body = payload("app_mention", ts=f"173568960{streaming:d}.000100")
            body["event_id"] = f"Ev-hostile-{streaming}"
            await gw.event(body)
            [answer] = await gw.answered(*thread_of(body))
            calls = [c for c in gw.fake.calls if c.method.startswith("chat.")]
        sent = [answer.text, *(b.get("text", "") for b in answer.blocks)]
        sent += [str(c.args.get(k) or "") for c in calls for k in ("text", "markdown_text")]
        for text in sent:
            assert live_parts(text) == [], text
        assert "evil.example/login" in answer.text  # shown as written, only inert


def test_streamed_prefixes_of_hostile_output_are_never_taken_back() -> None:
    from bots.slack import render

    shown = ""
    for end in range(len(HOSTILE) + 1):
        now = render.safe_text(render.stable_prefix(HOSTILE[:end]))
        assert now.startswith(shown)
        shown = now
    assert render.safe_text(HOSTILE).startswith(shown)
