"""Forgetting a person or a conversation, retention, identity hashes and tainted adapters, in
storage (SQLite and PostgreSQL)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import inspect, select, text, update

from storage import audit, conversations, forget, privacy, runs
from storage import feedback as store
from storage.adapters import new_version
from storage.models import (
    AdapterVersion,
    AnswerStatus,
    Conversation,
    EventStatus,
    ForgottenIdentity,
    InboundEvent,
    Message,
    RunStatus,
    utcnow,
)

ALICE, BOB = "telegram:123", "telegram:456"
STALE = timedelta(minutes=5)


async def dump(sessions) -> str:  # type: ignore[no-untyped-def]
    """Every row of every table as text: what a dump of the database holds."""
    async with sessions() as s:
        conn = await s.connection()
        names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
        lines = []
        for name in names:
            for row in (await conn.execute(text(f'SELECT * FROM "{name}"'))).all():
                lines.append(f"{name}: {tuple(row)}")
    return "\n".join(lines)


@dataclass
class Turn:
    conversation: int
    question: int
    answer: int
    event: int


async def ask(sessions, *, author: str, chat: str, text_: str) -> Turn:  # type: ignore[no-untyped-def]
    """One answered question, recorded as the core records it (event payload included)."""
    event_id = uuid.uuid4().hex
    async with sessions() as s:
        conv = await conversations.current_conversation(s, channel="telegram", chat_id=chat)
        turn = await conversations.begin_turn(
            s, channel="telegram", event_id=event_id, conversation_id=conv, text=text_,
            author_id=author, payload={"v": 1, "user_id": author, "text": text_,
                                       "event_id": event_id, "chat_id": chat})
        assert turn is not None
        answer = await conversations.finish_turn(
            s, turn=turn, text=f"Answer to: {text_}", status=AnswerStatus.OK,
            meta=conversations.AnswerMeta(model="m", adapter=None))
        await conversations.mark_delivered(s, turn=turn, answer_id=answer,
                                           external_message_id=None)
    return Turn(conv, turn.question_id, answer, turn.event_id)


async def test_forget_deletes_a_persons_private_chats_and_their_part_of_shared_ones(
        sessions) -> None:  # type: ignore[no-untyped-def]
    private = [await ask(sessions, author=ALICE, chat="123", text_=f"alice secret {i}")
               for i in range(2)]
    group_alice = await ask(sessions, author=ALICE, chat="-100", text_="alice in the group")
    group_bob = await ask(sessions, author=BOB, chat="-100", text_="bob in the group")
    bob_private = await ask(sessions, author=BOB, chat="456", text_="bob alone")
    async with sessions() as s:
        await store.record_vote(s, answer_id=group_alice.answer, voter_id=BOB, rating=1,
                                source="telegram")
        await store.record_vote(s, answer_id=group_bob.answer, voter_id=ALICE, rating=-1,
                                source="telegram", reason="alice's reason")
        await store.record_correction(s, answer_id=bob_private.answer, voter_id=ALICE,
                                      text="alice's correction", source="telegram",
                                      trusted=False)
        await audit.log(s, actor=ALICE, action=audit.Action.APPROVE, target="feedback:1")

    async with sessions() as s:
        erased = await forget.forget_identity(s, identity=ALICE, actor="cli:op")
    assert erased.conversations == {private[0].conversation, group_alice.conversation}
    assert erased.answers == {group_bob.answer, bob_private.answer}  # what she voted on
    assert erased.counts == {"messages": 6, "feedback": 3, "event_payloads": 3,
                             "conversations": 1}

    async with sessions() as s:
        assert await s.get(Conversation, private[0].conversation) is None
        assert await s.get(Conversation, group_alice.conversation) is not None
        left = set((await s.execute(select(Message.text))).scalars())
        assert left == {"bob in the group", "Answer to: bob in the group", "bob alone",
                        "Answer to: bob alone"}
        events = {e.id: e for e in (await s.execute(select(InboundEvent))).scalars()}
        for gone in (*private, group_alice):  # the idempotency record stays, without the copy
            e = events[gone.event]
            assert (e.payload, e.message_id, e.status) == (None, None, EventStatus.DONE)
        assert events[group_bob.event].payload["text"] == "bob in the group"
        salt = await privacy.identity_salt(s)
        kept = list((await s.execute(select(ForgottenIdentity.identity_hash))).scalars())
        assert kept == [privacy.identity_hash(salt, ALICE)] == [erased.identity_hash]
        entries = await audit.recent(s)
    assert [(e.actor, e.action, e.target) for e in entries] == [
        ("cli:op", "forget", f"identity:{erased.identity_hash[:16]}"),
        (f"forgotten:{erased.identity_hash[:16]}", "approve", "feedback:1")]
    everything = await dump(sessions)
    assert "alice" not in everything and ALICE not in everything
    assert "'123'" not in everything  # her private chat's id
    assert "bob in the group" in everything


async def test_a_forgotten_message_redelivered_is_still_a_duplicate(sessions) -> None:  # type: ignore[no-untyped-def]
    turn = await ask(sessions, author=ALICE, chat="123", text_="hello")
    async with sessions() as s:
        event_id = (await s.get(InboundEvent, turn.event)).external_event_id
        await forget.forget_identity(s, identity=ALICE, actor="cli:op")
        conv = await conversations.current_conversation(s, channel="telegram", chat_id="123")
        again = await conversations.begin_turn(
            s, channel="telegram", event_id=event_id, conversation_id=conv, text="hello",
            author_id=ALICE)
    assert again is None


async def test_forgetting_a_conversation_deletes_everything_in_it_only(sessions) -> None:  # type: ignore[no-untyped-def]
    first = await ask(sessions, author=ALICE, chat="-100", text_="alice asks")
    await ask(sessions, author=BOB, chat="-100", text_="bob asks")
    other = await ask(sessions, author=BOB, chat="456", text_="bob elsewhere")
    async with sessions() as s:
        await store.record_vote(s, answer_id=first.answer, voter_id=BOB, rating=1,
                                source="telegram")
        erased = await forget.forget_conversation(s, conversation_id=first.conversation,
                                                  actor="cli:op")
        assert erased.counts == {"messages": 4, "feedback": 1, "event_payloads": 2,
                                 "conversations": 1}
        assert set((await s.execute(select(Message.text))).scalars()) == {
            "bob elsewhere", "Answer to: bob elsewhere"}
        assert await s.get(Conversation, other.conversation) is not None
        assert not list((await s.execute(select(ForgottenIdentity))).scalars())
        nothing = await forget.forget_conversation(s, conversation_id=first.conversation,
                                                   actor="cli:op")
        assert nothing.counts == {}
        [entry] = await audit.recent(s, action="forget")
    assert entry.target == f"conversation:{first.conversation}"


async def _age(sessions, turn: Turn, days: int) -> None:  # type: ignore[no-untyped-def]
    when = utcnow() - timedelta(days=days)
    async with sessions() as s:
        await s.execute(update(Message).where(Message.id.in_([turn.question, turn.answer]))
                        .values(created_at=when))
        await s.execute(update(Conversation).where(Conversation.id == turn.conversation,
                                                   Conversation.created_at > when)
                        .values(created_at=when))
        await s.commit()


async def test_retention_deletes_only_what_is_older_than_the_period(sessions) -> None:  # type: ignore[no-untyped-def]
    old = await ask(sessions, author=ALICE, chat="1", text_="old question")
    await _age(sessions, old, 40)
    mixed_old = await ask(sessions, author=BOB, chat="2", text_="bob's old question")
    await _age(sessions, mixed_old, 35)
    await ask(sessions, author=BOB, chat="2", text_="bob's new question")
    recent = await ask(sessions, author=ALICE, chat="3", text_="recent question")
    await _age(sessions, recent, 29)
    async with sessions() as s:
        await store.record_vote(s, answer_id=old.answer, voter_id=BOB, rating=1,
                                source="telegram")
        erased = await forget.delete_older_than(s, cutoff=utcnow() - timedelta(days=30),
                                                actor=audit.RETENTION, days=30)
    assert erased.counts == {"messages": 4, "feedback": 1, "event_payloads": 2,
                             "conversations": 1}
    assert erased.conversations == {old.conversation, mixed_old.conversation}
    async with sessions() as s:
        assert set((await s.execute(select(Message.text))).scalars()) == {
            "bob's new question", "Answer to: bob's new question", "recent question",
            "Answer to: recent question"}
        assert await s.get(Conversation, old.conversation) is None
        assert await s.get(Conversation, mixed_old.conversation) is not None
        again = await forget.delete_older_than(s, cutoff=utcnow() - timedelta(days=30),
                                               actor=audit.RETENTION, days=30)
        assert not again.anything
        [entry] = await audit.recent(s)
    assert (entry.actor, entry.action, entry.detail["messages"]) == (
        "system:retention", "retention", 4)


async def _run(sessions, *, status: RunStatus = RunStatus.SUCCEEDED) -> int:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        run_id = await runs.start_run(s, trigger="manual", stale_after=STALE)
        assert run_id is not None
        if status != RunStatus.RUNNING:
            await runs.finish_run(s, run_id=run_id, status=status)
    return run_id


async def _register(sessions, run_id: int, name: str, parent: str | None,  # type: ignore[no-untyped-def]
                    status: str = "retired") -> None:
    async with sessions() as s:
        s.add(new_version(name=name, path=f"/a/{name}", rank=4, parent_name=parent,
                          run_id=run_id, dataset_hash="h", metrics={}))
        await s.commit()
        await s.execute(update(AdapterVersion).where(AdapterVersion.name == name)
                        .values(status=status))
        await s.commit()


async def _tainted(sessions) -> set[str]:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        stmt = select(AdapterVersion.name).where(AdapterVersion.tainted_at.is_not(None))
        return set((await s.execute(stmt)).scalars())


async def test_runs_that_used_a_person_taint_their_adapters_and_descendants(sessions) -> None:  # type: ignore[no-untyped-def]
    theirs = await ask(sessions, author=ALICE, chat="1", text_="q")
    others = await ask(sessions, author=BOB, chat="2", text_="q")
    r1, r2, r3 = [await _run(sessions) for _ in range(3)]
    async with sessions() as s:
        await store.record_vote(s, answer_id=others.answer, voter_id=ALICE, rating=1,
                                source="telegram")
        assert await privacy.record_run_identities(
            s, run_id=r1, conversation_ids={theirs.conversation}, answer_ids={theirs.answer}) == 1
        assert await privacy.record_run_identities(
            s, run_id=r3, conversation_ids={others.conversation},
            answer_ids={others.answer}) == 2  # bob wrote it, alice voted on it
    await _register(sessions, r1, "fb-v1", None)
    await _register(sessions, r2, "fb-v2", "fb-v1", status="active")  # from a tainted parent
    await _register(sessions, r3, "fb-v3", None, status="rejected")
    running = await _run(sessions, status=RunStatus.RUNNING)
    async with sessions() as s:
        assert await privacy.retrain_due(s) is None
        bob_runs = await privacy.runs_of(s, (await privacy.hashes(s, [BOB]))[BOB])
        alice_runs = await privacy.runs_of(s, (await privacy.hashes(s, [ALICE]))[ALICE])
        assert (bob_runs, alice_runs) == ({r3}, {r1, r3})
        assert await privacy.taint(s, run_ids=alice_runs | {running}) == [
            "fb-v1", "fb-v2", "fb-v3"]
        assert "fb-v2" in (await privacy.retrain_due(s) or "")  # the active one
    async with sessions() as s:  # the running run registers its adapter after the forget
        await runs.finish_run(s, run_id=running, status=RunStatus.SUCCEEDED)
    await _register(sessions, running, "fb-v4", None, status="canary")
    assert await _tainted(sessions) == {"fb-v1", "fb-v2", "fb-v3"}
    async with sessions() as s:
        assert await privacy.propagate_taint(s) == ["fb-v4"]
        await _run(sessions)  # a run started since: no retrain is due any more
        assert await privacy.retrain_due(s) is None


async def test_datasets_leave_out_a_forgotten_person_who_writes_again(sessions) -> None:  # type: ignore[no-untyped-def]
    @dataclass
    class Row:
        voter_id: str
        question_id: int

    async with sessions() as s:
        await forget.forget_identity(s, identity=ALICE, actor="cli:op")
    hers = await ask(sessions, author=ALICE, chat="-100", text_="alice again")
    bobs = await ask(sessions, author=BOB, chat="-100", text_="bob")
    rows = [Row(BOB, hers.question), Row(ALICE, bobs.question), Row(BOB, bobs.question)]
    async with sessions() as s:
        assert await privacy.without_forgotten(s, rows) == [Row(BOB, bobs.question)]
        assert await privacy.forgotten(s, [ALICE, BOB]) == {ALICE}
        gone = await privacy.forgotten_messages(s, conversation_ids={hers.conversation})
    assert gone == {hers.question, hers.answer}


async def test_the_salt_is_made_at_first_use_if_the_migration_did_not(sessions) -> None:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        made = await privacy.identity_salt(s)
        await s.execute(text("DELETE FROM installationsecret"))
        await s.commit()
        new = await privacy.identity_salt(s)
        assert new != made and len(new) == 64 and await privacy.identity_salt(s) == new
