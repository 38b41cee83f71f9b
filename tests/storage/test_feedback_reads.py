"""The learning loop's feedback reads, revisions, the review queue and the feedback the
canary compares (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from storage import conversations, feedback, runs
from storage.models import AnswerStatus, Feedback, FeedbackRole, Message, RunStatus, utcnow
from tests.storage.test_conversations import _answer, _turn

STALE = timedelta(minutes=5)


async def _exchange(sessions, n: int, *, chat: str | None = None,  # type: ignore[no-untyped-def]
                    status: AnswerStatus = AnswerStatus.OK, adapter: str | None = None) -> int:
    """Question `q{n}` and its answer `a{n}`; returns the answer id."""
    turn = await _turn(sessions, event_id=f"e{n}", chat=chat or f"c{n}", text=f"q{n}")
    async with sessions() as s:
        return await conversations.finish_turn(
            s, turn=turn, text=f"a{n}" if status == AnswerStatus.OK else "", status=status,
            meta=conversations.AnswerMeta(model="m", adapter=adapter))


async def test_unlearned_feedback_joins_answers_and_questions_on_ok_answers_only(sessions) -> None:  # type: ignore[no-untyped-def]
    ok = await _exchange(sessions, 1)
    failed = await _exchange(sessions, 2, status=AnswerStatus.FAILED)
    async with sessions() as s:
        await feedback.record_vote(s, answer_id=ok, voter_id="v", rating=1, source="web")
        await feedback.record_vote(s, answer_id=failed, voter_id="v", rating=-1, source="t")
        await feedback.record_correction(s, answer_id=ok, voter_id="r", text="Better.",
                                         source="t", trusted=True)
        rows = await feedback.unlearned_feedback(s, learned_by=[])
    assert [(r.voter_id, r.rating, r.correction, r.review_status) for r in rows] == [
        ("v", 1, None, None), ("r", None, "Better.", "approved")]
    first = rows[0]
    assert (first.answer_id, first.answer, first.question) == (ok, "a1", "q1")
    assert first.question_id < first.answer_id and first.created_at.tzinfo is not None
    assert (first.revision, first.source, first.fresh, first.adapter) == (1, "web", True, None)
    assert rows[1].trusted


async def _revision(s, answer: int, voter: str) -> int:  # type: ignore[no-untyped-def]
    stmt = select(Feedback.revision).where(Feedback.answer_id == answer,
                                           Feedback.voter_id == voter)
    return (await s.execute(stmt.execution_options(populate_existing=True))).scalar_one()


async def test_every_change_bumps_the_revision_and_a_repeat_does_not(sessions) -> None:  # type: ignore[no-untyped-def]
    answer = await _exchange(sessions, 1)
    async with sessions() as s:
        vote = dict(answer_id=answer, voter_id="v", source="t")
        await feedback.record_vote(s, rating=1, **vote)
        assert await _revision(s, answer, "v") == 1
        await feedback.record_vote(s, rating=1, **vote)  # a repeated delivery
        assert await _revision(s, answer, "v") == 1
        await feedback.record_vote(s, rating=-1, **vote)  # 👍 turned 👎
        assert await _revision(s, answer, "v") == 2
        await feedback.record_vote(s, rating=-1, reason="wrong", **vote)
        assert await _revision(s, answer, "v") == 3
        fix = dict(answer_id=answer, voter_id="v", source="t", trusted=False)
        await feedback.record_correction(s, text="Better.", **fix)
        await feedback.record_correction(s, text="Better.", **fix)
        assert await _revision(s, answer, "v") == 4
        await feedback.record_correction(s, text="Better still.", **fix)  # edited
        assert await _revision(s, answer, "v") == 5
        [pending] = await feedback.pending_corrections(s)
        assert await feedback.review_correction(s, feedback_id=pending.feedback_id, approve=True)
        assert await _revision(s, answer, "v") == 6


async def _run(s, status: RunStatus, consumed: dict[int, tuple[int, str]]) -> int:  # type: ignore[no-untyped-def]
    run_id = await runs.start_run(s, trigger="manual", stale_after=STALE)
    await runs.record_consumed(s, run_id=run_id, consumed=consumed)
    await runs.finish_run(s, run_id=run_id, status=status)
    return run_id


async def test_what_a_run_settled_is_not_read_again_until_it_changes(sessions) -> None:  # type: ignore[no-untyped-def]
    labelled, lone, held = [await _exchange(sessions, n) for n in range(3)]
    async with sessions() as s:
        for voter in ("a", "b"):
            await feedback.record_vote(s, answer_id=labelled, voter_id=voter, rating=1,
                                       source="t")
        await feedback.record_vote(s, answer_id=lone, voter_id="a", rating=1, source="t")
        await feedback.record_correction(s, answer_id=held, voter_id="r", text="Held.",
                                         source="t", trusted=True)
        rows = {(r.answer_id, r.voter_id): r for r in
                await feedback.unlearned_feedback(s, learned_by=[])}
        roles = {(labelled, "a"): "trained", (labelled, "b"): "trained",
                 (lone, "a"): "unused", (held, "r"): "heldout"}
        run = await _run(s, RunStatus.SUCCEEDED,
                         {rows[k].id: (1, role) for k, role in roles.items()})
        again = await feedback.unlearned_feedback(s, learned_by=[run])
        assert [(r.answer_id, r.fresh) for r in again] == [(held, True)]  # held out: still new
        assert len(await feedback.unlearned_feedback(s, learned_by=[])) == 4  # another lineage
        await feedback.record_vote(s, answer_id=lone, voter_id="c", rating=1, source="t")
        await feedback.record_vote(s, answer_id=labelled, voter_id="b", rating=-1, source="t")
        again = await feedback.unlearned_feedback(s, learned_by=[run])
    # a second voter brings the answer's first vote back; a changed vote its answer's others
    assert sorted((r.answer_id, r.voter_id, r.revision, r.fresh) for r in again) == sorted([
        (labelled, "a", 1, False), (labelled, "b", 2, True), (lone, "a", 1, False),
        (lone, "c", 1, True), (held, "r", 1, True)])


async def test_first_seen_is_a_voters_first_vote_or_message(sessions) -> None:  # type: ignore[no-untyped-def]
    answer = await _exchange(sessions, 1)  # asked by u1
    month_ago = utcnow() - timedelta(days=30)
    async with sessions() as s:
        await s.execute(update(Message).where(Message.author_id == "u1")
                        .values(created_at=month_ago))
        await s.commit()
        for voter in ("u1", "new"):
            await feedback.record_vote(s, answer_id=answer, voter_id=voter, rating=1, source="t")
        seen = await feedback.first_seen(s, voters={"u1", "new", "nobody"})
        assert await feedback.first_seen(s, voters=set()) == {}
    assert set(seen) == {"u1", "new"}
    assert abs(seen["u1"] - month_ago) < timedelta(seconds=1)
    assert utcnow() - seen["new"] < timedelta(minutes=1)


async def test_transcripts_are_every_message_of_the_conversations_in_order(sessions) -> None:  # type: ignore[no-untyped-def]
    a1 = await _exchange(sessions, 1, chat="x")
    await _exchange(sessions, 2, chat="x", status=AnswerStatus.FAILED)
    other = await _exchange(sessions, 3, chat="y")
    async with sessions() as s:
        conv_x = (await conversations.get_message(s, message_id=a1)).conversation_id
        conv_y = (await conversations.get_message(s, message_id=other)).conversation_id
        found = await feedback.transcripts(s, conversation_ids={conv_x})
        assert await feedback.transcripts(s, conversation_ids=[]) == {}
    assert list(found) == [conv_x] and conv_y != conv_x
    assert [(m.role, m.text, m.status) for m in found[conv_x]] == [
        ("user", "q1", None), ("assistant", "a1", "ok"), ("user", "q2", None),
        ("assistant", "", "failed")]
    assert found[conv_x][1].reply_to_id == found[conv_x][0].id


async def test_a_conversations_split_is_recorded_once(sessions) -> None:  # type: ignore[no-untyped-def]
    ids = []
    for n in range(3):
        answer = await _exchange(sessions, n)
        async with sessions() as s:
            ids.append((await conversations.get_message(s, message_id=answer)).conversation_id)
    async with sessions() as s:
        assert await feedback.recorded_splits(s, conversation_ids=ids) == {}
        await feedback.record_splits(s, splits={ids[0]: True, ids[1]: False})
        await feedback.record_splits(s, splits={ids[0]: False, ids[2]: True})  # first one wins
        await feedback.record_splits(s, splits={})
        assert await feedback.recorded_splits(s, conversation_ids=ids) == {
            ids[0]: True, ids[1]: False, ids[2]: True}


async def test_eligible_feedback_is_votes_and_approved_corrections(sessions) -> None:  # type: ignore[no-untyped-def]
    answer = await _answer(sessions, await _turn(sessions))
    async with sessions() as s:
        await feedback.record_vote(s, answer_id=answer, voter_id="v", rating=-1, source="t")
        await feedback.record_correction(s, answer_id=answer, voter_id="u", text="Hm.",
                                         source="t", trusted=False)
        assert await feedback.eligible_count(s) == 1
        [pending] = await feedback.pending_corrections(s)
        assert (pending.voter_id, pending.question, pending.answer, pending.correction) == (
            "u", "hi", "hello", "Hm.")
        assert await feedback.review_correction(s, feedback_id=pending.feedback_id,
                                                approve=True)
        assert not await feedback.review_correction(s, feedback_id=pending.feedback_id,
                                                    approve=False)  # no longer pending
        assert await feedback.pending_corrections(s) == []
        assert await feedback.eligible_count(s) == 2


async def test_the_threshold_counts_revisions_no_finished_run_read(sessions) -> None:  # type: ignore[no-untyped-def]
    answer = await _answer(sessions, await _turn(sessions))
    async with sessions() as s:
        await feedback.record_vote(s, answer_id=answer, voter_id="v", rating=1, source="t")
        await feedback.record_correction(s, answer_id=answer, voter_id="u", text="Hm.",
                                         source="t", trusted=False)
        [vote, fix] = await feedback.unlearned_feedback(s, learned_by=[])
        read = {vote.id: (1, "unused"), fix.id: (1, "unused")}
        await _run(s, RunStatus.FAILED, read)  # a failed run consumed nothing
        assert await feedback.eligible_count(s) == 1
        await _run(s, RunStatus.SKIPPED, read)
        assert await feedback.eligible_count(s) == 0
        await feedback.review_correction(s, feedback_id=fix.id, approve=True)  # approved late
        assert await feedback.eligible_count(s) == 1
        await feedback.record_vote(s, answer_id=answer, voter_id="v", rating=-1, source="t")
        assert await feedback.eligible_count(s) == 2


async def test_a_passed_runs_heldout_conversations_are_released_for_training(sessions) -> None:  # type: ignore[no-untyped-def]
    answers = [await _exchange(sessions, n) for n in range(3)]
    async with sessions() as s:
        convs = [(await conversations.get_message(s, message_id=a)).conversation_id
                 for a in answers]
        for a in answers:
            await feedback.record_correction(s, answer_id=a, voter_id="r", text="Fix.",
                                             source="t", trusted=True)
        await feedback.record_splits(s, splits=dict.fromkeys(convs, True))
        rows = await feedback.unlearned_feedback(s, learned_by=[])
        held = FeedbackRole.HELDOUT
        await _run(s, RunStatus.SUCCEEDED, {rows[0].id: (1, held)})
        await _run(s, RunStatus.REJECTED, {rows[1].id: (1, held)})
        assert await feedback.passed_heldout(s, conversation_ids=convs) == {convs[0]}
        assert await feedback.passed_heldout(s, conversation_ids=[]) == set()
        await feedback.release_heldout(s, conversation_ids={convs[0]})
        await feedback.release_heldout(s, conversation_ids=[])
        assert await feedback.recorded_splits(s, conversation_ids=convs) == {
            convs[0]: False, convs[1]: True, convs[2]: True}
        assert await feedback.passed_heldout(s, conversation_ids=convs) == {convs[0]}


async def test_a_rejected_correction_is_neither_pending_nor_eligible(sessions) -> None:  # type: ignore[no-untyped-def]
    answer = await _answer(sessions, await _turn(sessions))
    async with sessions() as s:
        await feedback.record_correction(s, answer_id=answer, voter_id="u", text="No.",
                                         source="t", trusted=False)
        [pending] = await feedback.pending_corrections(s, limit=5)
        assert await feedback.review_correction(s, feedback_id=pending.feedback_id,
                                                approve=False)
        assert await feedback.pending_corrections(s) == []
        assert await feedback.eligible_count(s) == 0


async def test_feedback_on_adapters_is_on_their_answers_since_a_time(sessions) -> None:  # type: ignore[no-untyped-def]
    canary = [await _exchange(sessions, n, adapter="fb-v1") for n in range(3)]
    base = await _exchange(sessions, 9)
    other = await _exchange(sessions, 10, adapter="fb-v0")
    async with sessions() as s:
        for answer in (*canary, base, other):
            await feedback.record_vote(s, answer_id=answer, voter_id="v", rating=-1, source="t")
        hour_ago = utcnow() - timedelta(hours=1)

        async def on(*adapters, since=hour_ago) -> list[tuple[int, str | None]]:  # type: ignore[no-untyped-def]
            rows = await feedback.feedback_on_adapters(s, adapters=adapters, since=since)
            return [(r.answer_id, r.adapter) for r in rows]

        assert await on("fb-v1", None) == [(a, "fb-v1") for a in canary] + [(base, None)]
        assert await on("fb-v1") == [(a, "fb-v1") for a in canary]
        assert await on(None) == [(base, None)]
        assert await on("fb-v1", since=utcnow() + timedelta(minutes=1)) == []
