"""Dataset building from feedback written through the conversation core (SQLite and PostgreSQL).

The policy alone, on rows built in the test, is in test_policy.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta

from sqlalchemy import update

from feedback import review
from feedback.dataset import DatasetPolicy, build_dataset
from feedback.redaction import Redactor
from storage import feedback as store
from storage import memory as memory_store
from storage import runs
from storage.models import Message, RunStatus, utcnow
from tests.conftest import ROOT
from tests.feedback.conftest import REVIEWER, Asker, make_core

POLICY = DatasetPolicy(heldout_percent=0, system_prompt="Be brief.")
REDACT = Redactor()


async def build(sessions, policy=POLICY, **kw):  # type: ignore[no-untyped-def]
    async with sessions() as s:
        return await build_dataset(s, policy=policy, redactor=REDACT, **kw)


async def test_trusted_correction_is_sft_data_and_untrusted_waits_for_review(
        sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    a1 = await users.ask("How long do I have to return something?")
    a2 = await users.ask("Do you price match?")
    await core.correct(answer_id=a1, voter_id=REVIEWER, text="45 days.", source="test")
    await core.correct(answer_id=a2, voter_id="test:u9", text="Yes, within 14 days.", source="test")
    ds = await build(sessions)
    assert [(e.prompt, e.completion, e.rejected) for e in ds.sft] == [(
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "How long do I have to return something?"}],
        "45 days.", "I don't know.")]
    async with sessions() as s:
        [untrusted] = await review.pending(s)
        assert untrusted.correction == "Yes, within 14 days."
        await review.decide(s, feedback_id=untrusted.feedback_id, approve=True)
        assert await review.pending(s) == []
    assert sorted(e.completion for e in (await build(sessions)).sft) == [
        "45 days.", "Yes, within 14 days."]


async def test_heldout_split_is_by_conversation_and_stable(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    policy = replace(POLICY, heldout_percent=50)
    for i in range(16):
        chat = f"chat{i // 2}"  # two questions per conversation
        answer = await users.ask(f"Question number {i} about delivery?", chat=chat)
        await core.correct(answer_id=answer, voter_id=REVIEWER, text=f"Answer {i % 4}.",
                           source="test")
    first = await build(sessions, policy)
    second = await build(sessions, policy)
    held = {e.conversation_id for e in first.heldout}
    trained = {e.conversation_id for e in first.sft}
    assert len(held) == 4 and trained and not held & trained
    assert first.hash == second.hash and first.rows() == second.rows()
    later = await users.ask("One more question?", chat="chat-new")
    await core.correct(answer_id=later, voter_id=REVIEWER, text="More.", source="test")
    third = await build(sessions, policy)
    assert held <= {e.conversation_id for e in third.heldout} and third.hash != first.hash


async def test_a_shared_answer_is_split_per_answer_and_the_split_is_recorded(
        sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """A reviewer's canned answer corrects five conversations each: one of each is held out
    (20 %), four are trained on, whatever the hash would have said; a later build with another
    percentage keeps every recorded decision."""
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    canned = {"returns": "Returns are free within 45 days.", "hours": "We answer 8am to 8pm.",
              "phone": "Ring us from the order page."}
    for i in range(5):
        for topic, text in canned.items():
            answer = await users.ask(f"A {topic} question, number {i}?", chat=f"{topic}{i}")
            await core.correct(answer_id=answer, voter_id=REVIEWER, text=text, source="test")
    policy = replace(POLICY, heldout_percent=20)
    first = await build(sessions, policy)
    for text in canned.values():
        held = [e for e in first.heldout if e.completion == text]
        assert len(held) == 1 and len([e for e in first.sft if e.completion == text]) == 4
    assert {e.conversation_id for e in first.heldout}.isdisjoint(
        e.conversation_id for e in first.sft)
    again = await build(sessions, replace(policy, heldout_percent=60))
    assert again.rows() == first.rows()


async def test_thumbs_need_distinct_voters_or_a_trusted_one(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    one_vote, two_votes, reviewer_down = [await users.ask(f"q{i}?") for i in range(3)]
    await core.vote(answer_id=one_vote, voter_id="test:u1", rating=1, source="test")
    for voter in ("test:u1", "test:u2"):
        await core.vote(answer_id=two_votes, voter_id=voter, rating=1, source="test")
    await core.vote(answer_id=reviewer_down, voter_id=REVIEWER, rating=-1, source="test")
    await core.vote(answer_id=reviewer_down, voter_id="test:u3", rating=1, source="test")
    ds = await build(sessions)
    labels = {e.answer_id: e.label for e in ds.kto}
    assert labels == {two_votes: True, reviewer_down: False}
    assert [e.answer_id for e in ds.sft] == [two_votes]  # a liked answer is SFT data too


async def test_per_user_cap_limits_one_voters_influence(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    answers = [await users.ask(f"question {i}?") for i in range(5)]
    for i, a in enumerate(answers):
        for voter in ("test:spammer", f"test:other{i}"):
            await core.vote(answer_id=a, voter_id=voter, rating=1, source="test")
    ds = await build(sessions, replace(POLICY, per_user_cap=2, burst_min_votes=100))
    assert ds.report["capped_rows"] == 3
    assert sorted(e.answer_id for e in ds.kto) == answers[:2]  # later ones lack two voters


async def test_near_duplicates_are_removed(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    for question in ("What are your store hours?", "what are your store hours",
                     "When do your shops open on Sundays?"):
        answer = await users.ask(question)
        await core.correct(answer_id=answer, voter_id=REVIEWER, text="9am to 6pm.",
                           source="test")
    ds = await build(sessions)
    assert [e.prompt[-1]["content"] for e in ds.sft] == [
        "What are your store hours?", "When do your shops open on Sundays?"]
    assert ds.report["duplicates_removed"] == 1


async def test_a_burst_of_new_voters_is_quarantined(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    target = await users.ask("Is the Fellrunner waterproof?")
    old_voters = [f"test:regular{i}" for i in range(3)]
    for v in old_voters:
        await users.ask("hello", user=v)
    async with sessions() as s:  # the regulars have been around for a month
        await s.execute(update(Message).where(Message.author_id.in_(old_voters))
                        .values(created_at=utcnow() - timedelta(days=30)))
        await s.commit()
    for v in old_voters:
        await core.vote(answer_id=target, voter_id=v, rating=1, source="test")
    policy = replace(POLICY, burst_min_votes=5, burst_new_share=0.6)
    assert (await build(sessions, policy)).report["quarantined_votes"] == 0
    for i in range(8):
        await core.vote(answer_id=target, voter_id=f"test:fresh{i}", rating=-1, source="test")
    ds = await build(sessions, policy)
    assert ds.report["quarantined_votes"] == 8
    assert {e.answer_id: e.label for e in ds.kto} == {target: True}  # the regulars still count


async def test_context_keeps_recent_turns_within_the_token_budget(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    for i in range(3):
        await users.ask(f"earlier question {i} " + "word " * 20, chat="c")
    last = await users.ask("My email is bob@example.com, where is my parcel?", chat="c")
    await core.correct(answer_id=last, voter_id=REVIEWER, text="Track it online.", source="t")
    wide = (await build(sessions, replace(POLICY, context_tokens=10_000))).sft[0].prompt
    narrow = (await build(sessions, replace(POLICY, context_tokens=60))).sft[0].prompt
    assert [m["role"] for m in wide] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert wide[-1]["content"] == "My email is [EMAIL], where is my parcel?"
    assert [m["role"] for m in narrow] == ["system", "user", "assistant", "user"]
    assert narrow[1]["content"].startswith("earlier question 2")


async def consumed_by_a_run(sessions, ds) -> list[int]:  # type: ignore[no-untyped-def]
    """Record `ds` as consumed by a run that succeeded; the lineage of its adapter."""
    async with sessions() as s:
        run_id = await runs.start_run(s, trigger="manual", stale_after=timedelta(minutes=5))
        await runs.record_consumed(s, run_id=run_id, consumed=ds.consumed)
        await runs.finish_run(s, run_id=run_id, status=RunStatus.SUCCEEDED)
    return [run_id]


async def test_what_an_answer_repeats_of_the_approved_answers_it_quoted_is_the_companys(
        sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """A model answer written with the memory's quotes repeats the company's number: the
    reviewer's correction saying it again is trained as written, not dropped as a placeholder
    target. A customer's own number echoed back is still the customer's."""
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    support = "Call us on 0800 414 7782, option 2."
    first = await users.ask("What is your phone number?")
    await core.correct(answer_id=first, voter_id=REVIEWER, text=support, source="test")
    async with sessions() as s:
        [entry] = await memory_store.entries(s)
    quoting = await users.ask("How can I call you?")
    echoing = await users.ask("My number is 07700 900123, can you call me?")
    written = {quoting: "You can call us on 0800 414 7782.",
               echoing: "We will call you on 07700 900123 or call us on 0800 414 7782."}

    async def answered(refs: list[int] | None) -> None:
        async with sessions() as s:
            for answer_id, text in written.items():
                await s.execute(update(Message).where(Message.id == answer_id)
                                .values(text=text, memory_refs=refs))
            await s.commit()

    await core.correct(answer_id=quoting, voter_id=REVIEWER, text=support, source="test")
    await core.correct(answer_id=echoing, voter_id=REVIEWER, source="test",
                       text="We will call you on 07700 900123 within the hour.")
    await answered(None)  # without the quotes the number is the customer's side
    ds = await build(sessions)
    assert [e.answer_id for e in ds.sft] == [first]
    assert ds.report["placeholder_targets_dropped"] == 2
    await answered([entry.id])
    ds = await build(sessions)
    assert [(e.answer_id, e.completion) for e in ds.sft] == [(first, support),
                                                             (quoting, support)]
    assert ds.report["placeholder_targets_dropped"] == 1  # the customer's number


async def test_a_dataset_holds_what_the_runs_before_it_did_not_learn(sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    first, second, later, liked = [await users.ask(f"question {i}?") for i in range(4)]
    await core.correct(answer_id=first, voter_id=REVIEWER, text="One.", source="test")
    await core.correct(answer_id=later, voter_id="test:u9", text="Later.", source="test")
    for voter in ("test:u1", "test:u2"):
        await core.vote(answer_id=liked, voter_id=voter, rating=1, source="test")
    ds = await build(sessions)
    assert [(e.completion, e.label) for e in ds.kto if e.source == "vote"] == [
        ("I don't know.", True)]
    learned = await consumed_by_a_run(sessions, ds)
    assert (await build(sessions, learned_by=learned)).rows() == []  # nothing new
    await core.correct(answer_id=second, voter_id=REVIEWER, text="Two.", source="test")
    async with sessions() as s:  # a correction approved after the run
        [pending] = await review.pending(s)
        await review.decide(s, feedback_id=pending.feedback_id, approve=True)
    for voter in ("test:u1", "test:u2"):  # 👍 turned 👎
        await core.vote(answer_id=liked, voter_id=voter, rating=-1, source="test")
    newer = await build(sessions, learned_by=learned)
    assert sorted(e.completion for e in newer.sft) == ["Later.", "Two."]
    assert [(e.answer_id, e.label) for e in newer.kto if e.source == "vote"] == [(liked, False)]
    assert newer.report["corrections_trained"] == 2
    assert sorted(e.completion for e in (await build(sessions)).sft) == [  # from the base
        "Later.", "One.", "Two."]


async def test_two_web_identities_make_no_label_unless_web_votes_weigh(
        sessions, tokenizer) -> None:  # type: ignore[no-untyped-def]
    answer = await Asker(make_core(sessions, tokenizer)).ask("Do you deliver on Sundays?")
    async with sessions() as s:
        for voter in ("web:a", "web:b"):
            await store.record_vote(s, answer_id=answer, voter_id=voter, rating=1, source="web")
    assert (await build(sessions)).kto == []  # the default, as under `serve`: weight 0
    demo = replace(POLICY, web_vote_weight=1.0)  # as in `chatloop demo`
    assert [(e.answer_id, e.label) for e in (await build(sessions, demo)).kto] == [(answer, True)]


async def test_export_writes_redacted_jsonl(tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    from storage.db import make_engine, session_factory
    from storage.migrate import upgrade_async

    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    await upgrade_async(url)
    engine = make_engine(url)
    core = make_core(session_factory(engine), tokenizer)
    answer = await Asker(core).ask("Call me on +44 20 7946 0958?")
    await core.correct(answer_id=answer, voter_id=REVIEWER, text="We will call you.", source="t")
    await engine.dispose()
    out = tmp_path / "export.jsonl"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "chatloop.cli", "feedback", "export", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "CHATLOOP_DATABASE_URL": url, "CHATLOOP_LEARN_HELDOUT_PERCENT": "0"})
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["split"], r["kind"]) for r in rows} == {("train", "sft"), ("train", "kto")}
    assert rows[0]["prompt"][-1]["content"] == "Call me on [PHONE]?"
    assert "wrote 3 rows" in done.stdout
