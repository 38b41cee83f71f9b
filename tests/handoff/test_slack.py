"""Slack hand-off end to end: signed requests into real gateways (slack-bolt), the fake Web API."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select

from bots.core.handoff import BACK
from storage.models import Feedback, Handoff
from tests.fakes.slack_api import Posted
from tests.slack.conftest import Gateway, Launch, payload, thread_of

AGENTS = "C0AGENTS"
SETTINGS = dict(slack_handoff_channel=AGENTS, reviewers=["slack:T111/UAGENT"])


def _in(gw: Gateway, channel: str, thread: str | None = None) -> list[Posted]:
    return [m for m in gw.fake.messages.values()
            if m.channel == channel and (thread is None or m.thread_ts == thread)]


def _event(body: dict[str, Any], event_id: str, **event: Any) -> dict[str, Any]:
    body = payload(body) if isinstance(body, str) else body
    body["event_id"] = event_id
    body["event"].update(event)
    return body


async def test_an_agent_takes_over_in_slack_and_a_second_replica_stays_silent(
        launch: Launch, sqlite_url: str) -> None:
    async with launch(sqlite_url, **SETTINGS) as gw, launch(sqlite_url, **SETTINGS) as other:
        ask = payload("app_mention")
        channel, thread = thread_of(ask)
        await gw.event(ask)
        [answer] = await gw.answered(channel, thread)
        assert (await gw.interact(answer.click("handoff_request"))).status_code == 200
        [escalation] = await gw.fake.wait_for(lambda: _in(gw, AGENTS))
        await gw.fake.wait_for(lambda: any("asked for a person" in m.text
                                           for m in _in(gw, channel, thread)))
        assert "summarize this" in str(escalation.blocks)
        asked = len(gw.backend.requests) + len(other.backend.requests)

        await gw.interact(escalation.click("handoff_take", user="UAGENT", name="maya"))
        await gw.fake.wait_for(lambda: any("maya from the team" in m.text
                                           for m in _in(gw, channel, thread)))
        # the user's follow-up reaches the other replica: relayed, not answered
        await other.event(_event("thread_reply", "Ev0101", text="it is about my refund"))
        await gw.fake.wait_for(lambda: any(m.text == "*User:* it is about my refund"
                                           for m in _in(gw, AGENTS, escalation.ts)))
        reply = _event("thread_reply", "Ev0102", channel=AGENTS, thread_ts=escalation.ts,
                       user="UAGENT", ts="1735689700.000100", text="Refunds take five days.")
        reply["event"]["channel_type"] = "channel"
        await other.event(reply)
        await gw.fake.wait_for(lambda: any(m.text == "*maya:* Refunds take five days."
                                           for m in _in(gw, channel, thread)))
        await other.idle()
        await gw.idle()
        assert len(gw.backend.requests) + len(other.backend.requests) == asked

        async with gw.services.sessions() as s:
            [fb] = (await s.execute(select(Feedback).where(Feedback.source == "handoff"))
                    ).scalars().all()
            [h] = (await s.execute(select(Handoff))).scalars().all()
        assert (fb.voter_id, fb.correction, fb.trusted) == (
            "slack:T111/UAGENT", "Refunds take five days.", True)
        assert fb.answer_id == int(answer.feedback["elements"][0]["value"]) == h.answer_id

        await gw.interact(escalation.click("handoff_back", user="UAGENT", name="maya"))
        await gw.fake.wait_for(lambda: any(m.text == BACK for m in _in(gw, channel, thread)))
        await gw.event(_event("thread_reply", "Ev0103", text="and on Sundays?",
                              ts="1735689800.000100"))
        await gw.answered(channel, thread, count=2)
        assert len(gw.backend.requests) + len(other.backend.requests) == asked + 1


async def test_bot_not_in_the_agents_channel_is_stored(launch: Launch, sqlite_url: str) -> None:
    async with launch(sqlite_url, **SETTINGS) as gw:
        gw.fake.gone[AGENTS] = "not_in_channel"
        dm = payload("dm")
        await gw.event(_event(dm, "Ev0201", text="/human"))
        await gw.fake.wait_for(lambda: gw.fake.count("chat.postMessage") >= 2)
        await gw.idle()
        async with gw.services.sessions() as s:
            [h] = (await s.execute(select(Handoff))).scalars().all()
        assert (h.status, h.error, h.agent_ref) == ("waiting", "slack:not_in_channel", None)
        asked = len(gw.backend.requests)
        await gw.event(_event(payload("dm"), "Ev0202", text="hello?", ts="1735689900.000100"))
        await gw.idle()
        assert len(gw.backend.requests) == asked  # still with the people, nothing answered


async def test_an_agent_answering_the_moment_the_escalation_appears_reaches_the_user(
        launch: Launch, sqlite_url: str) -> None:
    """The escalation is in the agents' channel before it is linked to its hand-off: a reply
    in its thread in that moment waits for the link instead of being dropped."""
    async with launch(sqlite_url, **SETTINGS) as gw:
        desk = gw.services.core.handoff
        link, find = desk.escalated, desk.by_agent_ref
        missed: list[str] = []
        replies: list[asyncio.Task[Any]] = []

        async def looked_up(agent_chat: str, agent_ref: str) -> Any:
            found = await find(agent_chat, agent_ref)
            if found is None:
                missed.append(agent_ref)
            return found

        async def link_late(handoff_id: int, *, agent_chat: str, agent_ref: str) -> None:
            reply = _event("thread_reply", "Ev0301", channel=AGENTS, thread_ts=agent_ref,
                           user="UAGENT", ts="1735689700.000300", text="Hello, I am here.")
            reply["event"]["channel_type"] = "channel"
            replies.append(asyncio.create_task(gw.event(reply)))
            await gw.fake.wait_for(lambda: missed)  # the reply found no hand-off yet
            await link(handoff_id, agent_chat=agent_chat, agent_ref=agent_ref)

        desk.by_agent_ref, desk.escalated = looked_up, link_late
        dm = payload("dm")
        channel = dm["event"]["channel"]
        await gw.event(_event(dm, "Ev0300", text="/human"))
        await gw.fake.wait_for(lambda: any("Hello, I am here." in m.text
                                           for m in _in(gw, channel)))
        [response] = await asyncio.gather(*replies)
        assert response.status_code == 200
        await gw.idle()
        async with gw.services.sessions() as s:
            [h] = (await s.execute(select(Handoff))).scalars().all()
        assert (h.status, h.agent_id) == ("held", "slack:T111/UAGENT")
