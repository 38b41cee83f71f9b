"""`chatloop forget`: a person's hand-offs and every message relayed in them go with them."""

from __future__ import annotations

from sqlalchemy import select

from storage import forget
from storage import handoff as store
from storage.models import Handoff, HandoffMessage, Message, Role
from tests.feedback.conftest import Asker, make_core


async def _handed(sessions, core, user: str, text: str) -> int:  # type: ignore[no-untyped-def]
    answer = await Asker(core).ask(text, user=user)
    async with sessions() as s:
        conv = (await s.execute(select(Message.conversation_id).where(
            Message.id == answer, Message.role == Role.ASSISTANT))).scalar_one()
        row, _ = await store.request(s, conversation_id=conv, channel="test", chat_id=user,
                                     thread_id="", user_id=user, reason="button")
        assert row.id is not None
        await store.add_message(s, handoff_id=row.id, direction="in", author_id=user,
                                text=f"{text} (my address is 1 Elm St)", delivery=None)
        await store.add_message(s, handoff_id=row.id, direction="out",
                                author_id="test:agent", text=f"Re: {text}", delivery=None)
        return row.id


async def test_forgetting_a_person_deletes_their_hand_offs_and_relayed_messages(  # type: ignore[no-untyped-def]
        sessions, tokenizer) -> None:
    core = make_core(sessions, tokenizer)
    await _handed(sessions, core, "test:ann", "Where is my parcel?")
    kept = await _handed(sessions, core, "test:bob", "Can I pay by card?")
    async with sessions() as s:
        erased = await forget.forget_identity(s, identity="test:ann", actor="cli:op")
    assert erased.counts["handoff_messages"] == 2 and erased.counts["handoffs"] == 1
    async with sessions() as s:
        left = list((await s.execute(select(HandoffMessage))).scalars())
        handoffs = list((await s.execute(select(Handoff))).scalars())
    assert {m.handoff_id for m in left} == {kept} and len(left) == 2
    assert not any("Elm St" in m.text and m.author_id == "test:ann" for m in left)
    assert [h.user_id for h in handoffs] == ["test:bob"]

    # an agent who is forgotten: the messages they relayed go, the hand-off stays
    async with sessions() as s:
        erased = await forget.forget_identity(s, identity="test:agent", actor="cli:op")
        assert erased.counts["handoff_messages"] == 1
        texts = [m.text for m in (await s.execute(select(HandoffMessage))).scalars()]
    assert texts == ["Can I pay by card? (my address is 1 Elm St)"]
