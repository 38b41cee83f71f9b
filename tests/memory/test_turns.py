"""Answer memory on the turn path, on real SQLite and PostgreSQL: an approved correction in one
channel answers the next paraphrase in another within seconds, in every replica."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import select
from typer.testing import CliRunner

from bots.core import Outcome
from chatloop.cli import app
from feedback import review
from storage import memory as store
from storage.forget import forget_identity
from storage.models import MemoryEntry, MemoryStatus, Message
from tests.fakes.inference import ScriptedBackend
from tests.fakes.sinks import RecordingSink
from tests.memory.conftest import REVIEWER, make_core, make_memory, message

QUESTION = "How long do I have to return something?"
PARAPHRASE = "How long do I have to return an item?"
ANSWER = ("You can return any unused item within 45 days of delivery for a full refund; worn "
          "gear can be returned within 30 days for store credit. Call 0800 414 7782.")


async def corrected(core, sessions) -> int:  # type: ignore[no-untyped-def]
    """A Telegram customer asks; the reviewer votes 👎 and corrects: the entry's id."""
    first = await core.handle(message("telegram", "111", QUESTION, "t1"), RecordingSink())
    await core.vote(answer_id=first.answer_id, voter_id=REVIEWER, rating=-1, source="telegram")
    fb = await core.correct(answer_id=first.answer_id, voter_id=REVIEWER, text=ANSWER,
                            source="telegram")
    async with sessions() as s:
        return (await s.execute(select(MemoryEntry.id).where(
            MemoryEntry.feedback_id == fb.id))).scalar_one()


async def ask_until(core, text: str, *, channel="slack", user="T0/U222", want=True,  # type: ignore[no-untyped-def]
                    deadline_s: float = 10.0):
    """Ask (a new event each time) until the answer is (want) or is not from memory."""
    end = time.monotonic() + deadline_s
    n = 0
    while True:
        n += 1
        sink = RecordingSink()
        result = await core.handle(message(channel, user, text, f"{channel}-{user}-{n}-{text}",
                                           chat=f"{user}-{n}"), sink)
        if (result.memory_entry_id is not None) == want or time.monotonic() > end:
            return result, sink
        await asyncio.sleep(0.05)


async def test_a_correction_in_telegram_answers_a_paraphrase_in_slack(sessions, tokenizer,  # type: ignore[no-untyped-def]
                                                                      embedder) -> None:
    core = make_core(sessions, tokenizer, make_memory(sessions, embedder))
    entry = await corrected(core, sessions)
    approved = time.monotonic()
    result, sink = await ask_until(core, PARAPHRASE)
    assert time.monotonic() - approved < 5
    assert result.outcome == Outcome.ANSWERED and result.memory_entry_id == entry
    assert sink.final == ANSWER  # as written: the company's number stays
    async with sessions() as s:
        stored = await s.get(Message, result.answer_id)
    assert stored.memory_entry_id == entry and stored.text == ANSWER


async def test_a_second_replica_serves_it_too_and_a_restart_keeps_it(sessions, tokenizer,  # type: ignore[no-untyped-def]
                                                                     embedder) -> None:
    one = make_core(sessions, tokenizer, make_memory(sessions, embedder))
    two = make_core(sessions, tokenizer, make_memory(sessions, embedder))
    await two.handle(message("slack", "T0/U9", "hello there", "warm"), RecordingSink())
    entry = await corrected(one, sessions)
    approved = time.monotonic()
    result, _ = await ask_until(two, PARAPHRASE)
    assert result.memory_entry_id == entry and time.monotonic() - approved < 5
    restarted = make_memory(sessions, embedder)
    await restarted.refresh()
    assert (await restarted.recall(PARAPHRASE)).verbatim.id == entry


async def test_an_unrelated_question_is_answered_by_the_model_alone(sessions, tokenizer,  # type: ignore[no-untyped-def]
                                                                    embedder) -> None:
    backend = ScriptedBackend()
    core = make_core(sessions, tokenizer, make_memory(sessions, embedder), backend)
    await corrected(core, sessions)
    result, sink = await ask_until(core, "Who invented the telephone?", want=False,
                                   deadline_s=0)
    assert result.memory_entry_id is None and sink.final.startswith("Echo:")
    assert "Approved answers" not in backend.requests[-1].messages[0].content


async def test_a_correction_repeating_the_customers_number_is_never_served(  # type: ignore[no-untyped-def]
        sessions, db_url, tokenizer, embedder, monkeypatch, tmp_path) -> None:
    """The reviewer's answer is the company speaking, but a customer's number it echoes is
    that customer's: such an entry answers nobody (training redacts it the same way), and
    `chatloop memory list` says so."""
    backend = ScriptedBackend()
    core = make_core(sessions, tokenizer, make_memory(sessions, embedder), backend)
    asked = "Please call me back on 07700 900123 about my refund"
    first = await core.handle(message("telegram", "111", asked, "t1"), RecordingSink())
    fb = await core.correct(answer_id=first.answer_id, voter_id=REVIEWER, source="telegram",
                            text="We will call you on 07700 900123 about your refund today.")
    async with sessions() as s:
        entry = (await s.execute(select(MemoryEntry).where(
            MemoryEntry.feedback_id == fb.id))).scalar_one()
    assert entry.status == MemoryStatus.ACTIVE  # kept as written, for the team to see
    await core.memory.refresh()
    result, sink = await ask_until(core, "Please call me back about my refund", want=False,
                                   deadline_s=0)
    assert result.memory_entry_id is None and sink.final.startswith("Echo:")
    recall = await core.memory.recall(asked)
    assert recall.verbatim is None and not recall.references
    assert "900123" not in backend.requests[-1].messages[0].content
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("CHATLOOP_DATABASE_URL", db_url)
    listed = await asyncio.to_thread(CliRunner().invoke, app, ["memory", "list"])
    assert listed.exit_code == 0, listed.output
    line = next(x for x in listed.output.splitlines() if x.split()[0] == str(entry.id))
    assert line.endswith("(not served: repeats the asker's details)"), listed.output


async def test_between_the_thresholds_the_entries_go_into_the_prompt(sessions, tokenizer,  # type: ignore[no-untyped-def]
                                                                     embedder) -> None:
    backend = ScriptedBackend()
    memory = make_memory(sessions, embedder, answer_at=50.0, refer_at=0.3)
    core = make_core(sessions, tokenizer, memory, backend)
    entry = await corrected(core, sessions)
    await asyncio.sleep(0.25)  # past refresh_s
    result = await core.handle(message("slack", "T0/U3", PARAPHRASE, "s-ref"), RecordingSink())
    assert result.memory_entry_id is None
    sent = backend.requests[-1].messages
    assert "Approved answers to similar questions" in sent[0].content and ANSWER in sent[0].content
    # and shown as an earlier exchange, which a small model follows more closely
    assert [(m.role, m.content) for m in sent[1:]] == [
        ("user", QUESTION), ("assistant", ANSWER), ("user", PARAPHRASE)]
    async with sessions() as s:
        assert (await s.get(Message, result.answer_id)).memory_refs == [entry]


async def test_a_disabled_entry_is_no_longer_used(sessions, tokenizer, embedder) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer, make_memory(sessions, embedder))
    entry = await corrected(core, sessions)
    assert (await ask_until(core, PARAPHRASE))[0].memory_entry_id == entry
    async with sessions() as s:
        assert await store.set_status(s, entry_id=entry, status=MemoryStatus.DISABLED,
                                      by="cli:op")
    result, _ = await ask_until(core, PARAPHRASE, want=False)
    assert result.memory_entry_id is None


async def test_trusted_thumbs_down_disable_a_memory_answer_and_review_shows_it(  # type: ignore[no-untyped-def]
        sessions, db_url, tokenizer, embedder, monkeypatch, tmp_path) -> None:
    core = make_core(sessions, tokenizer, make_memory(sessions, embedder))
    entry = await corrected(core, sessions)
    result, _ = await ask_until(core, PARAPHRASE, channel="telegram", user="333")
    await core.vote(answer_id=result.answer_id, voter_id=REVIEWER, rating=-1, source="telegram")
    async with sessions() as s:
        stats = {e.id: e for e in await store.entries(s)}[entry]
    assert (stats.status, stats.disabled_by, stats.down, stats.uses) == (
        MemoryStatus.DISABLED, store.VOTES, 1, 1)
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("CHATLOOP_DATABASE_URL", db_url)
    shown = await asyncio.to_thread(CliRunner().invoke, app, ["review"])
    assert shown.exit_code == 0, shown.output
    assert f"memory entry {entry} turned down by votes (0 👍, 1 👎" in shown.output
    assert ANSWER in shown.output


async def test_a_reviewer_restating_a_memory_answer_keeps_its_entry(  # type: ignore[no-untyped-def]
        sessions, tokenizer, embedder) -> None:
    core = make_core(sessions, tokenizer, make_memory(sessions, embedder))
    entry = await corrected(core, sessions)
    result, _ = await ask_until(core, PARAPHRASE, channel="telegram", user="333")
    assert result.memory_entry_id == entry
    # the reviewer marks every answer 👎, then writes the company's answer: the entry's own
    await core.vote(answer_id=result.answer_id, voter_id=REVIEWER, rating=-1, source="telegram")
    async with sessions() as s:
        assert {e.id: e for e in await store.entries(s)}[entry].status == MemoryStatus.DISABLED
    fb = await core.correct(answer_id=result.answer_id, voter_id=REVIEWER, text=f" {ANSWER}\n",
                            source="telegram")
    async with sessions() as s:
        stats = {e.id: e for e in await store.entries(s)}
        new = (await s.execute(select(MemoryEntry.id).where(
            MemoryEntry.feedback_id == fb.id))).scalar_one()
    assert (stats[entry].status, stats[entry].disabled_by, stats[entry].down) == (
        MemoryStatus.ACTIVE, None, 0)
    assert stats[new].status == MemoryStatus.ACTIVE  # the paraphrase is an entry too
    # a correction that says something else is a word against the entry
    other, _ = await ask_until(core, QUESTION, channel="telegram", user="444")
    assert other.memory_entry_id in (entry, new)
    await core.vote(answer_id=other.answer_id, voter_id="telegram:901", rating=-1,
                    source="telegram")  # not a reviewer: no weight
    await core.vote(answer_id=other.answer_id, voter_id=REVIEWER, rating=-1, source="telegram")
    await core.correct(answer_id=other.answer_id, voter_id=REVIEWER, text="Returns: 14 days.",
                       source="telegram")
    async with sessions() as s:
        turned = {e.id: e for e in await store.entries(s)}[other.memory_entry_id]
    assert (turned.status, turned.disabled_by) == (MemoryStatus.DISABLED, store.VOTES)


async def test_a_correction_naming_another_approved_answer_keeps_the_entry(  # type: ignore[no-untyped-def]
        sessions, tokenizer, embedder) -> None:
    """The memory picked the wrong entry; the reviewer's correction is another entry's answer
    word for word (a saved reply): a word against the pick, not against the entry."""
    core = make_core(sessions, tokenizer, make_memory(sessions, embedder))
    entry = await corrected(core, sessions)
    exchange = "Size exchanges are free: start one from your order page."
    async with sessions() as s:
        await store.add_entries(s, [store.NewEntry("Can I swap a jacket for a bigger size?",
                                                   exchange)], actor="cli:op")
    result, _ = await ask_until(core, PARAPHRASE, channel="telegram", user="333")
    assert result.memory_entry_id == entry
    await core.vote(answer_id=result.answer_id, voter_id=REVIEWER, rating=-1, source="telegram")
    async with sessions() as s:
        assert {e.id: e for e in await store.entries(s)}[entry].status == MemoryStatus.DISABLED
    await core.correct(answer_id=result.answer_id, voter_id=REVIEWER, text=exchange,
                       source="telegram")
    async with sessions() as s:
        stats = {e.id: e for e in await store.entries(s)}[entry]
    assert (stats.status, stats.disabled_by, stats.down) == (MemoryStatus.ACTIVE, None, 0)


async def test_a_correction_approved_in_review_becomes_an_entry(sessions, tokenizer,  # type: ignore[no-untyped-def]
                                                                embedder) -> None:
    core = make_core(sessions, tokenizer, make_memory(sessions, embedder))
    first = await core.handle(message("telegram", "111", QUESTION, "t1"), RecordingSink())
    fb = await core.correct(answer_id=first.answer_id, voter_id="telegram:111", text=ANSWER,
                            source="telegram")
    async with sessions() as s:
        assert await store.entries(s) == []  # pending review: nothing answers from it
        await review.decide(s, feedback_id=fb.id, approve=True, actor=REVIEWER)
        [entry] = await store.entries(s)
    assert entry.approved_by == REVIEWER and entry.question == QUESTION
    assert (await ask_until(core, PARAPHRASE))[0].memory_entry_id == entry.id


async def test_a_forgotten_persons_corrections_leave_the_memory(sessions, tokenizer,  # type: ignore[no-untyped-def]
                                                                embedder) -> None:
    core = make_core(sessions, tokenizer, make_memory(sessions, embedder))
    entry = await corrected(core, sessions)
    assert (await ask_until(core, PARAPHRASE))[0].memory_entry_id == entry
    async with sessions() as s:
        erased = await forget_identity(s, identity=REVIEWER, actor="cli:op")
    assert erased.counts["memory_entries"] == 1
    async with sessions() as s:
        row = await s.get(MemoryEntry, entry)
    assert (row.status, row.question, row.answer, row.approved_by) == ("erased", "", "", None)
    result, _ = await ask_until(core, PARAPHRASE, want=False)
    assert result.memory_entry_id is None
