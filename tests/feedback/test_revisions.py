"""Nothing a reviewer gives is lost, nothing is held out for ever: learning-loop cycles with the
stand-in trainer, on SQLite and PostgreSQL.

Feedback is consumed by revision: a correction approved after a run, a vote changed after it,
are new to the next run, and the threshold counts them; a passed run's held-out corrections
are trained on by that run once its gate has passed (settling), or, without settling, by the
next run, whose gate judges only on conversations no candidate trained on.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from feedback import review
from feedback.dataset import DatasetPolicy
from feedback.evaluate import GatePolicy
from feedback.job import TrainJob
from feedback.loop import run_cycle, should_train
from storage import adapters
from storage.models import Conversation, RunFeedback
from tests.fakes.inference import ScriptedBackend
from tests.feedback.conftest import REVIEWER, Asker, loop_config, make_core
from tests.feedback.test_canary import chatloop


def rows(tmp_path: Path, run: int, name: str) -> list[dict]:  # type: ignore[type-arg]
    path = tmp_path / f"runs/run-{run}/{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def conversations(tmp_path: Path, run: int, *names: str) -> set[int]:
    return {r["conversation_id"] for name in names for r in rows(tmp_path, run, name)}


def config(tmp_path, model_dir, heldout_percent: int = 50, settle: bool = True):  # type: ignore[no-untyped-def]
    return loop_config(tmp_path, model_dir, fake="pass 0", min_interval=timedelta(0),
                       settle=settle, dataset=DatasetPolicy(heldout_percent=heldout_percent,
                                                            system_prompt="Be brief."))


async def correct(core, users: Asker, topic: str, n: int, voter: str = REVIEWER) -> None:  # type: ignore[no-untyped-def]
    """`n` questions on `topic`, each corrected with the topic's answer: the gate holds out
    some of them, never all (feedback.policy.split_conversations)."""
    for i in range(n):
        answer = await users.ask(f"How do I {topic}, case {i}?")
        await core.correct(answer_id=answer, voter_id=voter, text=f"To {topic}: see the guide.",
                           source="test")


async def cycle(sessions, cfg):  # type: ignore[no-untyped-def]
    """One cycle; a passing candidate is promoted (the canary's verdict, here by hand)."""
    result = await run_cycle(sessions, ScriptedBackend(), cfg, trigger="threshold")
    if result.status == "succeeded":
        async with sessions() as s:
            await adapters.promote(s, name=result.adapter)
    return result


async def approve_all(sessions) -> int:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        pending = await review.pending(s)
        for p in pending:
            await review.decide(s, feedback_id=p.feedback_id, approve=True)
    return len(pending)


async def test_a_correction_approved_after_run_1_is_counted_and_trained_by_run_2(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    await correct(core, users, "return a parcel", 4)
    late = await users.ask("How do I return a parcel from abroad?")
    await core.correct(answer_id=late, voter_id="test:u9", text="To return a parcel: see the "
                       "guide.", source="test")  # a user's suggestion: awaits review
    cfg = config(tmp_path, model_dir)
    assert (await cycle(sessions, cfg)).status == "succeeded"
    assert await should_train(sessions, cfg) == (
        False, "0 new eligible feedback (threshold 1)")
    assert await approve_all(sessions) == 1
    assert await should_train(sessions, cfg) == (True, "1 new eligible feedback")
    assert (await cycle(sessions, cfg)).status == "succeeded"

    def answers(run: int) -> set[int]:
        return {r["answer_id"] for r in rows(tmp_path, run, "sft") + rows(tmp_path, run, "heldout")
                if r["source"] == "correction"}

    assert late in answers(2) and late not in answers(1)


async def test_a_run_skipped_for_lack_of_data_does_not_lose_what_is_approved_later(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    """The demo's first minutes: corrections from a user wait for review, a lone 👎 makes no
    label; run 1 has nothing to train on. The approvals are counted and trained."""
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    for topic in ("track an order", "pay by card"):
        await correct(core, users, topic, 3, voter="test:u9")
    lone = await users.ask("Is there a shop in Leeds?")
    await core.vote(answer_id=lone, voter_id="test:u9", rating=-1, source="test")
    cfg = config(tmp_path, model_dir)
    assert await should_train(sessions, cfg) == (True, "1 new eligible feedback")
    first = await cycle(sessions, cfg)
    assert (first.status, first.reasons) == ("skipped", ("no training data in the new feedback",))
    assert (await should_train(sessions, cfg))[1] == "0 new eligible feedback (threshold 1)"
    assert await approve_all(sessions) == 6
    assert await should_train(sessions, cfg) == (True, "6 new eligible feedback")
    assert (await cycle(sessions, cfg)).status == "succeeded"
    run2 = rows(tmp_path, 2, "sft") + rows(tmp_path, 2, "heldout")
    assert sorted(r["completion"] for r in run2 if r["source"] == "correction") == [
        "To pay by card: see the guide."] * 3 + ["To track an order: see the guide."] * 3


async def test_a_vote_turned_down_after_run_1_is_a_down_label_in_run_2(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    await correct(core, users, "change my address", 2)
    answer = await users.ask("Can I pay by invoice?")
    for voter in ("test:u1", "test:u2"):
        await core.vote(answer_id=answer, voter_id=voter, rating=1, source="test")
    cfg = config(tmp_path, model_dir, heldout_percent=0)
    cfg.gate = GatePolicy(min_heldout=0)  # about labels, not the gate: nothing held out
    assert (await cycle(sessions, cfg)).status == "succeeded"
    votes = [(r["answer_id"], r["label"]) for r in rows(tmp_path, 1, "kto")
             if r["source"] == "vote"]
    assert votes == [(answer, True)]
    for voter in ("test:u1", "test:u2"):
        await core.vote(answer_id=answer, voter_id=voter, rating=-1, source="test")
    assert await should_train(sessions, cfg) == (True, "2 new eligible feedback")
    # one 👎 label is all run 2 has: enough to train on here
    cfg.train = TrainJob(model_dir=str(model_dir), out_dir="", work_dir="", kto_min_examples=1)
    assert (await cycle(sessions, cfg)).status == "succeeded"
    votes = [(r["answer_id"], r["label"]) for r in rows(tmp_path, 2, "kto")
             if r["source"] == "vote"]
    assert votes == [(answer, False)]
    assert [r for r in rows(tmp_path, 2, "sft") if r["source"] != "replay"] == []


async def test_a_passed_run_trains_its_held_out_corrections_and_no_later_run_reads_them(
        sessions, tokenizer, tmp_path, model_dir, db_url) -> None:  # type: ignore[no-untyped-def]
    """Settling (the default): once the candidate passes the gate, the worker trains it on
    the held-out corrections too (feedback.train._settle; the stand-in says it did). They
    count as trained by that run, their conversations are trained on from then on, no later
    run reads or holds them again, and they are in the replay pool."""
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    for topic in ("book a fitting", "repair a boot"):
        await correct(core, users, topic, 3)
    cfg = config(tmp_path, model_dir)
    first = await cycle(sessions, cfg)
    assert first.status == "succeeded"
    held1 = conversations(tmp_path, 1, "heldout")
    assert held1 and first.metrics["settle"]["kept"]
    assert first.metrics["settle"]["examples"] == len(held1)
    async with sessions() as s:
        roles = Counter(r.role for r in (await s.execute(select(RunFeedback))).scalars())
        splits = {c: (await s.get(Conversation, c)).heldout for c in held1}
    assert roles == {"trained": 6}
    assert splits == dict.fromkeys(held1, False)
    listed = chatloop(db_url, "runs")
    assert listed.returncode == 0, listed.stderr
    assert (f"corrections trained {6 - len(held1)} held out {len(held1)} carried over 0, then "
            f"trained on {len(held1)} held out") in listed.stdout
    for topic in ("cancel a subscription", "find my size"):
        await correct(core, users, topic, 3)
    second = await cycle(sessions, cfg)
    assert second.status == "succeeded"
    report = second.metrics["dataset"]
    assert (report["corrections_carried_over"], report["corrections_trained"]) == (
        0, 6 - report["corrections_heldout"])
    new = [r for r in rows(tmp_path, 2, "sft") if r["source"] != "replay"]
    assert not held1 & {r["conversation_id"] for r in new + rows(tmp_path, 2, "heldout")}
    pool = {r["conversation_id"] for r in rows(tmp_path, 1, "sft")} | held1
    assert {r["conversation_id"] for r in rows(tmp_path, 2, "sft")
            if r["source"] == "replay"} <= pool


async def test_heldout_corrections_of_run_1_are_trained_by_run_2_judged_on_unseen_data(
        sessions, tokenizer, tmp_path, model_dir, db_url) -> None:  # type: ignore[no-untyped-def]
    """Without settling: the next run with new data to hold out trains them."""
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    for topic in ("book a fitting", "repair a boot"):
        await correct(core, users, topic, 3)
    cfg = config(tmp_path, model_dir, settle=False)
    assert (await cycle(sessions, cfg)).status == "succeeded"
    held1 = conversations(tmp_path, 1, "heldout")
    trained1 = conversations(tmp_path, 1, "sft", "kto")
    assert held1 and trained1 and not held1 & trained1
    for topic in ("cancel a subscription", "find my size"):
        await correct(core, users, topic, 3)
    second = await cycle(sessions, cfg)
    assert second.status == "succeeded"
    trained2 = conversations(tmp_path, 2, "sft", "kto")
    held2 = conversations(tmp_path, 2, "heldout")
    assert held1 <= trained2  # carried over into training
    assert held2 and not held2 & (trained1 | trained2 | held1)  # the gate's data is unseen
    assert all(r["prompt"][-1]["content"].split(",")[0] in (
        "How do I cancel a subscription", "How do I find my size")
        for r in rows(tmp_path, 2, "heldout"))
    report = second.metrics["dataset"]
    assert report["corrections_carried_over"] == len(held1)
    assert report["corrections_heldout"] == len(held2)
    assert report["corrections_trained"] == 6 + len(held1) - len(held2)
    listed = chatloop(db_url, "runs")
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if x.startswith("#2 "))
    assert (f"corrections trained {report['corrections_trained']} held out {len(held2)} "
            f"carried over {len(held1)}") in line


async def test_without_new_data_to_hold_out_the_old_held_out_stays_the_gates(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    """Without settling, a passed run's held-out corrections are carried over by the next run
    that has new corrections to hold out; until then they remain the gate's (never trained
    on)."""
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    await correct(core, users, "book a fitting", 2)
    cfg = config(tmp_path, model_dir, settle=False)
    assert (await cycle(sessions, cfg)).status == "succeeded"  # one trained, one held out
    held1 = conversations(tmp_path, 1, "heldout")
    [trained] = conversations(tmp_path, 1, "sft")
    async with sessions() as s:  # a follow-up in the conversation run 1 trained on
        chat = (await s.get(Conversation, trained)).external_chat_id
    liked = await users.ask("Do you open on Sundays?", chat=chat)
    await core.vote(answer_id=liked, voter_id=REVIEWER, rating=1, source="test")
    second = await cycle(sessions, cfg)  # a label, no correction: nothing new to hold out
    assert second.status == "succeeded"
    assert conversations(tmp_path, 2, "heldout") == held1
    assert not held1 & conversations(tmp_path, 2, "sft", "kto")
    assert second.metrics["dataset"]["corrections_carried_over"] == 0
    await correct(core, users, "repair a boot", 2)
    third = await cycle(sessions, cfg)
    assert third.status == "succeeded"
    assert third.metrics["dataset"]["corrections_carried_over"] == 1
    trained = set().union(*(conversations(tmp_path, n, "sft", "kto") for n in (1, 2, 3)))
    assert held1 <= trained
    assert conversations(tmp_path, 3, "heldout") and not conversations(
        tmp_path, 3, "heldout") & trained


async def test_every_answer_corrected_once_is_trained_and_judged_on_rephrasings(
        db_url, sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    """Each correction with an answer of its own (a first demo): all are trained on, and the
    gate judges on rephrasings of their questions that no training example has."""
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    for topic in ("book a fitting", "change my address", "cancel an order"):
        answer = await users.ask(f"How can I {topic} online today?")
        await core.correct(answer_id=answer, voter_id=REVIEWER, text=f"To {topic}: call us.",
                           source="test")
    run = await cycle(sessions, config(tmp_path, model_dir, heldout_percent=100))
    assert run.status == "succeeded"
    trained = rows(tmp_path, 1, "sft")
    judged = rows(tmp_path, 1, "heldout")
    assert len(trained) == 3 and {r["source"] for r in judged} == {"rephrasing"}
    assert {r["completion"] for r in judged} <= {r["completion"] for r in trained}
    assert not {r["prompt"][-1]["content"] for r in judged} & {
        r["prompt"][-1]["content"] for r in trained}
    assert run.metrics["dataset"]["rephrasings"] == len(judged) >= 2
    listed = chatloop(db_url, "runs")
    assert listed.returncode == 0, listed.stderr
    assert (f"corrections trained 3 held out 0 carried over 0 (gate on {len(judged)} "
            "rephrasings)") in listed.stdout


async def test_a_run_with_nothing_to_judge_a_candidate_on_is_skipped(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    """No held-out correction at all and rephrasings off: the gate would reject any
    candidate, so the run does not train; what it read counts as seen until something
    changes."""
    core = make_core(sessions, tokenizer)
    await correct(core, Asker(core), "book a fitting", 2)
    cfg = replace(config(tmp_path, model_dir, heldout_percent=0),
                  gate=GatePolicy(rephrasings=False))
    run = await cycle(sessions, cfg)
    assert (run.status, run.reasons) == (
        "skipped", ("0 held-out corrections in the new feedback (the gate needs 1, or 4 "
                    "held-out votes liked and disliked; 0)",))
    assert not (tmp_path / "runs/run-1").exists()
    assert (await should_train(sessions, cfg))[0] is False
