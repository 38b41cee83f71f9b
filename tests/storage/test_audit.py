"""The audit log: entries, who made them, and the audited decisions of reviewers and of the
canary (SQLite and PostgreSQL)."""

from __future__ import annotations

import getpass

import pytest
from sqlalchemy import update

from feedback import review
from feedback.canary import CanaryPolicy, Decision, evaluate_canary
from feedback.dataset import DatasetPolicy
from storage import audit, conversations
from storage import feedback as store
from storage.adapters import new_version
from storage.models import AdapterVersion, AnswerStatus
from tests.storage.test_forget import ask


async def test_entries_are_listed_newest_first_and_by_action(sessions) -> None:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        await audit.log(s, actor="telegram:111", action=audit.Action.APPROVE,
                        target="feedback:1")
        await audit.log(s, actor="cli:op", action=audit.Action.PROMOTE, target="adapter:fb-v1",
                        detail={"why": "by hand"})
        await audit.log(s, actor="system:retention", action=audit.Action.RETENTION,
                        target="older than 30 days")
        newest = await audit.recent(s)
        assert [(e.actor, e.action) for e in newest] == [
            ("system:retention", "retention"), ("cli:op", "promote"), ("telegram:111", "approve")]
        assert newest[1].detail == {"why": "by hand"} and newest[0].at >= newest[2].at
        assert [e.target for e in await audit.recent(s, limit=1)] == ["older than 30 days"]
        [promoted] = await audit.recent(s, action="promote")
        assert promoted.target == "adapter:fb-v1"
        assert await audit.erasure_count(s) == 1  # retention and forget only
        audit.record(s, actor="cli:op", action=audit.Action.FORGET, target="conversation:1")
        await s.flush()
        async with sessions() as other:
            assert await audit.erasure_count(other) == 1  # not until it commits
        await s.commit()
        async with sessions() as other:
            assert await audit.erasure_count(other) == 2


def test_the_command_line_acts_as_the_operating_system_user() -> None:
    assert audit.cli_actor() == f"cli:{getpass.getuser()}"


async def test_review_decisions_are_audited_with_the_reviewer(sessions) -> None:  # type: ignore[no-untyped-def]
    turns = [await ask(sessions, author="telegram:456", chat="456", text_=f"q{i}")
             for i in range(3)]
    async with sessions() as s:
        ids = [(await store.record_correction(s, answer_id=t.answer, voter_id="telegram:456",
                                              text="Better.", source="telegram",
                                              trusted=False)).feedback.id for t in turns]
        await review.decide(s, feedback_id=ids[0], approve=True, actor="telegram:111")
        await review.decide(s, feedback_id=ids[1], approve=False)
        with pytest.raises(review.NotPending):
            await review.decide(s, feedback_id=ids[0], approve=False, actor="telegram:111")
        entries = await audit.recent(s)
    assert [(e.actor, e.action, e.target) for e in entries] == [
        (audit.cli_actor(), "reject", f"feedback:{ids[1]}"),
        ("telegram:111", "approve", f"feedback:{ids[0]}")]


async def test_the_canarys_own_decision_is_audited_as_the_system(sessions) -> None:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        s.add(new_version(name="fb-v1", path="/a/fb-v1", rank=4, parent_name=None, run_id=None,
                          dataset_hash="h", metrics={}))
        await s.commit()
    turn = await ask(sessions, author="telegram:456", chat="456", text_="q")
    async with sessions() as s:  # the canary served the answer, which a reviewer liked
        served = await conversations.finish_turn(
            s, turn=conversations.TurnStart(turn.conversation, turn.question, turn.event),
            text="again", status=AnswerStatus.OK,
            meta=conversations.AnswerMeta(model="m", adapter="fb-v1"))
        await store.record_vote(s, answer_id=served, voter_id="telegram:111", rating=1,
                                source="telegram", trusted=True)
        await s.execute(update(AdapterVersion).values(status="canary"))
        await s.commit()
    outcome = await evaluate_canary(sessions, CanaryPolicy(min_votes=1, margin=1.0,
                                                           handoff_margin=1.0),
                                    rules=DatasetPolicy())
    assert outcome.decision == Decision.PROMOTE
    async with sessions() as s:
        [entry] = await audit.recent(s)
    assert (entry.actor, entry.action, entry.target) == ("system:canary", "promote",
                                                         "adapter:fb-v1")
    assert {k: entry.detail[k] for k in ("canary", "control", "tainted")} == {
        "canary": [1, 0], "control": [0, 0], "tainted": False}
