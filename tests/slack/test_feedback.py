"""Ratings, modal corrections and agents' thread replies from Slack, stored through the core."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sqlalchemy import select

from bots.core import InboundMessage
from storage.models import Feedback, Message
from tests.fakes.sinks import RecordingSink
from tests.fakes.slack_api import Posted
from tests.slack.conftest import Gateway, Launch, payload, thread_of


async def _answer(gw: Gateway) -> tuple[Posted, int]:
    body = payload("app_mention")
    await gw.event(body)
    [posted] = await gw.answered(*thread_of(body))
    answer_id = int(posted.feedback["elements"][0]["value"])
    return posted, answer_id


def _click(posted: Posted, action: str, user: str = "U222") -> dict[str, Any]:
    body = payload("block_actions")
    body["user"]["id"] = user
    body["container"] |= {"message_ts": posted.ts, "channel_id": posted.channel}
    body["message"] = posted.payload()
    button = next(e for e in posted.feedback["elements"] if e["action_id"] == action)
    body["actions"] = [{**button, "block_id": "feedback", "action_ts": "1735689610.194939"}]
    return body


def _submission(answer_id: int, text: str, user: str) -> dict[str, Any]:
    body = payload("view_submission")
    body["user"]["id"] = user
    body["view"]["private_metadata"] = json.dumps({"answer_id": answer_id})
    body["view"]["state"]["values"]["correction_block"]["correction_input"]["value"] = text
    return body


async def _feedback(gw: Gateway) -> list[Feedback]:
    async with gw.services.sessions() as s:
        return list((await s.execute(select(Feedback).order_by(Feedback.id))).scalars())


def _styles(posted: Posted) -> dict[str, str | None]:
    return {e["action_id"]: e.get("style") for e in posted.feedback["elements"]}


async def test_vote_is_stored_then_changed_and_the_button_shows_it(gw: Gateway) -> None:
    posted, answer_id = await _answer(gw)
    assert (await gw.interact(_click(posted, "vote_up"))).status_code == 200
    [fb] = await _feedback(gw)
    assert (fb.answer_id, fb.voter_id, fb.rating, fb.source) == (answer_id, "slack:T111/U222", 1,
                                                               "slack")
    await gw.fake.wait_for(lambda: posted.edits == 1)
    assert _styles(posted)["vote_up"] == "primary" and _styles(posted)["vote_down"] is None
    assert posted.text == "Echo: summarize this"  # the answer stays visible
    assert (await gw.interact(_click(posted, "vote_down"))).status_code == 200
    [fb] = await _feedback(gw)
    assert fb.rating == -1
    await gw.fake.wait_for(lambda: posted.edits == 2)
    assert _styles(posted) == {"vote_up": None, "vote_down": "primary", "suggest": None}


async def test_suggest_opens_a_modal_for_that_answer(gw: Gateway) -> None:
    posted, answer_id = await _answer(gw)
    assert (await gw.interact(_click(posted, "suggest"))).status_code == 200
    [view] = await gw.fake.wait_for(lambda: gw.fake.views)
    assert view["callback_id"] == "correction"
    assert json.loads(view["private_metadata"]) == {"answer_id": answer_id}


async def test_modal_correction_is_trusted_for_a_reviewer_only(gw: Gateway) -> None:
    _, answer_id = await _answer(gw)
    r = await gw.interact(_submission(answer_id, "We open at 9.", user="U222"))
    assert r.status_code == 200 and not r.content  # an empty ack closes the modal
    r = await gw.interact(_submission(answer_id, "We open at 9 on weekdays.", user="UREV"))
    assert r.status_code == 200
    user_fb, reviewer_fb = await _feedback(gw)
    assert (user_fb.correction, user_fb.trusted, user_fb.review_status) == \
        ("We open at 9.", False, "pending")
    assert (reviewer_fb.correction, reviewer_fb.trusted, reviewer_fb.review_status) == \
        ("We open at 9 on weekdays.", True, "approved")


async def test_empty_correction_is_refused_in_the_modal(gw: Gateway) -> None:
    _, answer_id = await _answer(gw)
    r = await gw.interact(_submission(answer_id, "   ", user="U222"))
    assert r.json() == {"response_action": "errors",
                        "errors": {"correction_block": "Please write the better answer."}}
    r = await gw.interact(_submission(answer_id + 100, "Better.", user="U222"))
    assert r.json()["response_action"] == "errors"
    assert await _feedback(gw) == []


async def test_agent_reply_after_the_bot_is_a_trusted_correction(launch: Launch,
                                                                 sqlite_url: str) -> None:
    async with launch(sqlite_url, slack_agent_corrections=True) as gw:
        _, answer_id = await _answer(gw)
        reply = payload("thread_reply", user="UREV", text="Actually we open at 8.")
        assert (await gw.event(reply)).status_code == 200
        assert (await gw.event(reply, retry=1)).status_code == 200
        await asyncio.sleep(0.2)
        [fb] = await _feedback(gw)
        assert (fb.answer_id, fb.voter_id, fb.correction, fb.trusted, fb.source) == \
            (answer_id, "slack:T111/UREV", "Actually we open at 8.", True, "slack_thread")
        assert len(gw.backend.requests) == 1  # the agent's reply is not answered
        async with gw.services.sessions() as s:
            assert len((await s.execute(select(Message))).all()) == 2


async def test_agent_replies_are_ordinary_follow_ups_unless_configured(gw: Gateway) -> None:
    await _answer(gw)
    await gw.event(payload("thread_reply", user="UREV", text="Actually we open at 8."))
    await gw.answered("C111", "1735689600.000100", count=2)
    assert await _feedback(gw) == []


async def test_a_reviewer_is_a_user_of_one_workspace(gw: Gateway) -> None:
    _, answer_id = await _answer(gw)
    outsider = _submission(answer_id, "We open at 7.", user="UREV")
    outsider["user"]["team_id"] = outsider["team"]["id"] = "T999"  # UREV of another team
    assert (await gw.interact(outsider)).status_code == 200
    [fb] = await _feedback(gw)
    assert (fb.voter_id, fb.trusted, fb.review_status) == ("slack:T999/UREV", False, "pending")


async def test_feedback_on_another_channels_answer_is_as_if_it_did_not_exist(
        gw: Gateway) -> None:
    posted, _ = await _answer(gw)
    web = await gw.services.core.handle(InboundMessage(
        channel="web", event_id="w1", chat_id="x/tab", user_id="x", text="hi"), RecordingSink())
    click = _click(posted, "vote_up", user="UREV")
    click["actions"][0]["value"] = str(web.answer_id)
    assert (await gw.interact(click)).status_code == 200
    r = await gw.interact(_submission(web.answer_id or 0, "Better.", user="UREV"))
    assert r.json() == {"response_action": "errors",
                        "errors": {"correction_block": "That answer no longer exists."}}
    await gw.idle()
    assert await _feedback(gw) == [] and posted.edits == 0
