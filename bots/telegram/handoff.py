"""Telegram hand-off: the agents' forum supergroup, one topic per escalated conversation.

The bot administers `agents_chat` (a supergroup with topics; `can_manage_topics`). An
escalation creates a topic (`createForumTopic`) and posts the conversation so far into it;
the user's messages are relayed into the topic, agents' messages in the topic to the user
(under the agent's first name), and `/done` in the topic hands back. Media is refused with a
note, never dropped silently. A deleted topic is created again and what was not relayed is
sent there; a bot removed from the group, or blocked by the user, is logged and stored on
the hand-off (and the message), and nothing stored is lost.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiogram.types import Update, User

from bots.core import ConversationCore, InboundMessage, TurnResult, identity
from bots.core.handoff import BACK, TAKEN, Links
from bots.core.types import HandoffView, Relay
from bots.telegram.convert import CHANNEL, HUMAN_BUTTON, MEDIA, Ask, Target
from bots.telegram.outbound import (
    ChatUnreachable,
    DeliveryError,
    RetryPolicy,
    TelegramApi,
    TopicGone,
    call,
)

log = logging.getLogger(__name__)
MEDIA_REFUSED = "Only text is relayed: the user did not get that. Please type it."
DONE = "/done"


@dataclass(frozen=True, slots=True)
class AgentSays:
    """A person's message in a topic of the agents' group."""

    update_id: int
    thread: int
    agent: str  # identity
    name: str
    text: str | None  # None: media


@dataclass(frozen=True, slots=True)
class HumanButton:
    """"Talk to a person" pressed under an answer: asked like `/human`."""

    ask: Ask
    query_id: str


class TelegramHandoff:
    """The bridge between users' chats and the agents' forum topics."""

    def __init__(self, core: ConversationCore, api: TelegramApi, *, agents_chat: int) -> None:
        self._core, self._api, self.agents_chat = core, api, agents_chat
        self._desk = core.handoff
        self._links = Links()  # topics created here and not yet linked to their hand-off

    # -- classifying -----------------------------------------------------------------------------

    def classify(self, update: Update, me: User) -> AgentSays | HumanButton | None:
        """The hand-off's part of an update (None: the channel's usual handling)."""
        query = update.callback_query
        if query is not None and query.data == HUMAN_BUTTON and query.message is not None:
            chat = query.message.chat
            topic = getattr(query.message, "is_topic_message", None)
            thread = getattr(query.message, "message_thread_id", None) if topic else None
            msg = InboundMessage(channel=CHANNEL, event_id=str(update.update_id),
                                 chat_id=str(chat.id), user_id=str(query.from_user.id),
                                 text="/human button", thread_id=str(thread or ""))
            return HumanButton(Ask(msg, Target(chat.id, thread)), query.id)
        m = update.message
        if m is None or m.chat.id != self.agents_chat:
            return None
        if m.from_user is None or m.from_user.is_bot or not m.is_topic_message \
                or m.message_thread_id is None or m.forum_topic_created is not None:
            return None
        text = m.text
        if text is None and m.content_type not in MEDIA:
            return None
        return AgentSays(update.update_id, m.message_thread_id,
                         identity(CHANNEL, str(m.from_user.id)), m.from_user.first_name, text)

    # -- the user's side -------------------------------------------------------------------------

    async def after_turn(self, result: TurnResult) -> None:
        """What a recorded message asks of the agents' side: an escalation to post, or a
        message to relay into the topic."""
        if result.handoff is not None and result.handoff.new:
            await self.escalate(result.handoff)
        elif result.relay is not None:
            await self.relay_in(result.relay)

    async def after_vote(self, handoff: HandoffView) -> None:
        """A 👎 too many asked for a person: tell the user, post the escalation."""
        await self._tell_user(handoff, self._desk.requested_text())
        await self.escalate(handoff)

    async def escalate(self, handoff: HandoffView) -> bool:
        """Create the hand-off's topic, post the conversation so far and what the user wrote
        meanwhile; False if the agents' group cannot be reached (stored on the hand-off)."""
        name = f"#{handoff.id} {handoff.user_id}"[:128]
        try:
            async with self._links.linking():
                topic = await call(lambda: self._api.bot.create_forum_topic(
                    chat_id=self.agents_chat, name=name), self._api.policy)
                await self._desk.escalated(handoff.id, agent_chat=str(self.agents_chat),
                                           agent_ref=str(topic.message_thread_id))
        except DeliveryError as exc:
            await self._desk.failed(handoff.id, f"telegram:{_kind(exc)}")
            return False
        lines = [f"{'User' if role == 'user' else 'Bot'}: {text}"
                 for role, text in await self._desk.transcript(handoff)]
        intro = (f"{handoff.user_id} asked for a person ({handoff.reason}). Write here to "
                 f"answer them; {DONE} hands the conversation back to the bot.")
        where = Target(self.agents_chat, topic.message_thread_id)
        try:
            await self._api.send_plain(where, "\n\n".join([intro, *lines])[:4000], quote=False)
        except DeliveryError as exc:
            await self._desk.failed(handoff.id, f"telegram:{_kind(exc)}")
            return False
        for relay in await self._desk.pending(handoff.id):
            await self.relay_in(relay, retry=False)
        return True

    async def relay_in(self, relay: Relay, *, retry: bool = True) -> None:
        """The user's message into the hand-off's topic (a deleted topic is created again)."""
        handoff = await self._desk.find(relay.handoff.id) or relay.handoff
        if handoff.agent_ref is None:  # the escalation failed: try it again now
            if retry and await self.escalate(handoff):
                return  # escalate relays what is pending, this message included
            return
        where = Target(self.agents_chat, int(handoff.agent_ref))
        try:
            await self._api.send_plain(where, f"User: {relay.text}", quote=False)
        except TopicGone as exc:
            log.warning("hand-off %s: the agents' topic is gone (%s): creating it again",
                        handoff.id, exc.kind)
            await self._desk.failed(handoff.id, f"telegram:{exc.kind}")
            if retry:
                await self.escalate(handoff)
            return
        except DeliveryError as exc:
            await self._desk.delivered(relay.message_id, error=f"telegram:{_kind(exc)}")
            await self._desk.failed(handoff.id, f"telegram:{_kind(exc)}")
            return
        await self._desk.delivered(relay.message_id)

    # -- the agents' side ------------------------------------------------------------------------

    async def on_agent(self, says: AgentSays) -> None:
        handoff = await self._links.find(
            lambda: self._desk.by_agent_ref(str(self.agents_chat), str(says.thread)))
        topic = Target(self.agents_chat, says.thread)
        if handoff is None:  # agents talking in a topic of their own
            log.debug("agents' topic %s belongs to no hand-off: not relayed", says.thread)
            return
        if says.text is None:
            if await self._core.record_delivery(CHANNEL, str(says.update_id)):
                await self._say(topic, MEDIA_REFUSED)
            return
        if says.text.strip().split("@", 1)[0] == DONE:
            if not await self._core.record_delivery(CHANNEL, str(says.update_id)):
                return
            back = await self._desk.hand_back(handoff.id, by=says.agent)
            if back is not None:
                await self._tell_user(back, BACK)
                await self._say(topic, "Handed back to the bot.")
            return
        was = handoff.agent_id
        relay = await self._desk.agent_message(handoff.id, agent=says.agent, name=says.name,
                                               text=says.text,
                                               delivery=(CHANNEL, str(says.update_id)))
        if relay is None:
            if handoff.status == "closed":
                await self._say(topic, "This conversation was handed back to the bot; "
                                       "nothing was sent.")
            return
        if was != says.agent:
            await self._tell_user(relay.handoff, TAKEN.format(name=says.name))
        await self.relay_out(relay, says.name)

    async def relay_out(self, relay: Relay, name: str) -> None:
        """An agent's message to the user; a blocked bot ends the hand-off (stored, logged)."""
        h = relay.handoff
        try:
            await self._api.send_plain(_user(h), f"{name}: {relay.text}", quote=False)
        except DeliveryError as exc:
            kind = f"telegram:{_kind(exc)}"
            await self._desk.delivered(relay.message_id, error=kind)
            await self._desk.failed(h.id, kind)
            if isinstance(exc, ChatUnreachable):
                await self._desk.hand_back(h.id, by=f"system:{_kind(exc)}")
                if h.agent_ref:
                    await self._say(Target(self.agents_chat, int(h.agent_ref)),
                                    f"Not delivered: the user cannot be reached ({_kind(exc)}). "
                                    "The conversation is closed.")
            return
        await self._desk.delivered(relay.message_id)

    # -- timers ----------------------------------------------------------------------------------

    async def sweep_forever(self, interval_s: float) -> None:
        """Hand back idle hand-offs and apologise for long waits (one replica each)."""
        while True:
            try:
                for handoff, kind in await self._desk.due(CHANNEL):
                    if kind == "idle":
                        await self._tell_user(handoff, BACK)
                        if handoff.agent_ref:
                            await self._say(Target(self.agents_chat, int(handoff.agent_ref)),
                                            "No agent message for a while: handed back.")
                    else:
                        await self._tell_user(handoff, self._desk.late_text())
            except Exception:
                log.exception("telegram hand-off timers failed")
            await asyncio.sleep(interval_s)

    async def _tell_user(self, handoff: HandoffView, text: str) -> None:
        try:
            await self._api.send_plain(_user(handoff), text, quote=False)
        except DeliveryError as exc:
            await self._desk.failed(handoff.id, f"telegram:{_kind(exc)}")

    async def _say(self, where: Target, text: str) -> None:
        try:
            await self._api.send_plain(where, text, quote=False)
        except DeliveryError as exc:
            log.warning("telegram agents' chat: note not sent: %s", _kind(exc))

    async def answer_button(self, query_id: str) -> None:
        try:
            await call(lambda: self._api.bot.answer_callback_query(query_id),
                       RetryPolicy(attempts=2))
        except DeliveryError as exc:
            log.info("answerCallbackQuery %s failed: %s", query_id, exc)


def _user(h: HandoffView) -> Target:
    return Target(int(h.chat_id), int(h.thread_id) if h.thread_id else None)


def _kind(exc: DeliveryError) -> str:
    return getattr(exc, "kind", None) or type(exc).__name__.lower()
