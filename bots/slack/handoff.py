"""Slack hand-off: escalations in the agents' channel with "Take over" / "Hand back".

An escalation is posted to `handoff_channel` with the conversation so far; the user's later
messages go into its thread. The agent who takes over answers in the user's own thread (a
channel conversation: the core notes it as theirs, nothing is relayed) or in the
escalation's thread (a DM: relayed to the user as the bot, under the agent's name). Failures
(the bot not in the agents' channel, the user's conversation gone) are logged and stored on
the hand-off; the messages stay stored.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bots.core import ConversationCore, TurnResult
from bots.core.handoff import BACK, TAKEN, Links
from bots.core.types import HandoffView, InboundMessage, Relay
from bots.slack.api import SlackApi, SlackError
from bots.slack.convert import CHANNEL, voter
from bots.slack.render import safe_text, text_block

log = logging.getLogger(__name__)
TAKE, GIVE_BACK = "handoff_take", "handoff_back"
BLOCK = "handoff"


def escalation_blocks(h: HandoffView, transcript: list[tuple[str, str]],
                      state: str) -> list[dict[str, Any]]:
    """The escalation message: who asked, the conversation so far, its state, the buttons."""
    user = h.user_id.rsplit("/", 1)[-1]
    lines = "\n".join(f"*{'User' if r == 'user' else 'Bot'}:* {safe_text(t)[:500]}"
                      for r, t in transcript) or "_(no messages yet)_"
    def button(action: str, label: str) -> dict[str, Any]:
        return {"type": "button", "action_id": action, "value": str(h.id),
                "text": {"type": "plain_text", "text": label}}
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text":
            f"<@{user}> asked for a person ({h.reason}) · hand-off #{h.id} · {state}"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": lines[:2900]}},
        {"type": "actions", "block_id": BLOCK, "elements": [
            button(TAKE, "Take over"), button(GIVE_BACK, "Hand back")]},
    ]


class SlackHandoff:
    """The bridge between users' conversations and the agents' channel."""

    def __init__(self, core: ConversationCore, api: SlackApi, *, channel: str) -> None:
        self._core, self._api, self.channel = core, api, channel
        self._desk = core.handoff
        self._links = Links()  # escalations posted here and not yet linked to their hand-off

    async def after_turn(self, result: TurnResult) -> None:
        if result.handoff is not None and result.handoff.new:
            await self.escalate(result.handoff)
        elif result.relay is not None:
            await self.relay_in(result.relay)

    async def after_vote(self, h: HandoffView) -> None:
        """A 👎 too many asked for a person: tell the user, post the escalation."""
        await self._tell_user(h, self._desk.requested_text())
        await self.escalate(h)

    async def escalate(self, h: HandoffView) -> bool:
        transcript = await self._desk.transcript(h)
        try:
            async with self._links.linking():
                ts = await self._api.post(channel=self.channel, thread_ts=None,
                                          text=f"Hand-off #{h.id}: a person is asked for",
                                          blocks=escalation_blocks(h, transcript, "waiting"))
                await self._desk.escalated(h.id, agent_chat=self.channel, agent_ref=ts)
        except SlackError as exc:
            await self._desk.failed(h.id, f"slack:{exc.code}")
            return False
        for relay in await self._desk.pending(h.id):
            await self.relay_in(relay, retry=False)
        return True

    async def relay_in(self, relay: Relay, *, retry: bool = True) -> None:
        """The user's message into the escalation's thread."""
        h = await self._desk.find(relay.handoff.id) or relay.handoff
        if h.agent_ref is None:
            if retry:
                await self.escalate(h)
            return
        try:
            await self._api.post(channel=self.channel, thread_ts=h.agent_ref,
                                 text=f"*User:* {safe_text(relay.text)}")
        except SlackError as exc:
            await self._desk.delivered(relay.message_id, error=f"slack:{exc.code}")
            await self._desk.failed(h.id, f"slack:{exc.code}")
            return
        await self._desk.delivered(relay.message_id)

    async def on_button(self, body: dict[str, Any]) -> None:
        """"Take over" or "Hand back" pressed on an escalation."""
        action = (body.get("actions") or [{}])[0]
        try:
            handoff_id = int(action.get("value"))
        except (TypeError, ValueError):
            return
        agent = voter(body)
        user = body.get("user") or {}
        name = user.get("name") or user.get("username") or "An agent"
        if not agent:
            return
        if action.get("action_id") == TAKE:
            before = await self._desk.find(handoff_id)
            h = await self._desk.take(handoff_id, agent=agent, name=name)
            if h is not None and (before is None or before.agent_id != agent):
                await self._tell_user(h, TAKEN.format(name=name))
                await self._show(h, f"held by <@{user.get('id')}>")
        else:
            h = await self._desk.hand_back(handoff_id, by=agent)
            if h is not None:
                await self._tell_user(h, BACK)
                await self._show(h, "handed back to the bot")

    async def on_agent(self, msg: InboundMessage) -> bool:
        """A message in an escalation's thread; False if the thread is no escalation."""
        h = await self._links.find(lambda: self._desk.by_agent_ref(self.channel, msg.thread_id))
        if h is None:
            return False
        relay = await self._desk.agent_message(
            h.id, agent=msg.author, name=h.agent_name or "Support", text=msg.text,
            delivery=(CHANNEL, msg.event_id))
        if relay is None:
            return True
        was = h.agent_id
        if was != msg.author:
            await self._tell_user(relay.handoff, TAKEN.format(name=relay.handoff.agent_name))
            await self._show(relay.handoff, f"held by <@{msg.user_id.rsplit('/', 1)[-1]}>")
        name = relay.handoff.agent_name or "Support"
        try:
            await self._api.post(channel=h.chat_id, thread_ts=h.thread_id or None,
                                 text=f"*{name}:* {safe_text(relay.text)}",
                                 blocks=[text_block(f"**{name}:** {safe_text(relay.text)}")])
        except SlackError as exc:
            await self._desk.delivered(relay.message_id, error=f"slack:{exc.code}")
            await self._desk.failed(h.id, f"slack:{exc.code}")
            await self._note(h, f"Not delivered to the user ({exc.code}).")
            return True
        await self._desk.delivered(relay.message_id)
        return True

    async def sweep_forever(self, interval_s: float) -> None:
        while True:
            try:
                for h, kind in await self._desk.due(CHANNEL):
                    if kind == "idle":
                        await self._tell_user(h, BACK)
                        await self._show(h, "handed back to the bot (no agent message)")
                    else:
                        await self._tell_user(h, self._desk.late_text())
            except Exception:
                log.exception("slack hand-off timers failed")
            await asyncio.sleep(interval_s)

    async def _tell_user(self, h: HandoffView, text: str) -> None:
        try:
            await self._api.post(channel=h.chat_id, thread_ts=h.thread_id or None, text=text)
        except SlackError as exc:
            await self._desk.failed(h.id, f"slack:{exc.code}")

    async def _show(self, h: HandoffView, state: str) -> None:
        if h.agent_ref is None:
            return
        try:
            await self._api.update(channel=self.channel, ts=h.agent_ref,
                                   text=f"Hand-off #{h.id}: {state}",
                                   blocks=escalation_blocks(h, await self._desk.transcript(h),
                                                            state))
        except SlackError as exc:
            log.warning("slack: escalation %s not updated: %s", h.id, exc.code)

    async def _note(self, h: HandoffView, text: str) -> None:
        if h.agent_ref is None:
            return
        try:
            await self._api.post(channel=self.channel, thread_ts=h.agent_ref, text=text)
        except SlackError as exc:
            log.warning("slack: note on escalation %s not posted: %s", h.id, exc.code)
