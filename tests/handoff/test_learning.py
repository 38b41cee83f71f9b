"""What the loop learns from hand-offs and votes: the DPO files, the gate's held-out pairs and
votes, and the canary's hand-off rate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import select

from feedback.canary import Decision, Votes, decide_with_handoffs, evaluate_canary
from feedback.dataset import DatasetPolicy
from feedback.evaluate import GatePolicy, gate
from feedback.loop import run_cycle
from storage import handoff as handoff_store
from storage.models import AdapterStatus, Message, Role
from tests.fakes.inference import ScriptedBackend
from tests.feedback.conftest import REVIEWER, Asker, loop_config, make_core
from tests.feedback.test_canary import POLICY, RULES, _simulate, add, statuses


def report(cand: dict[str, Any], parent: dict[str, Any], **top: Any) -> dict[str, Any]:
    base = {"heldout_loss": None, "heldout_accuracy": 0.0, "heldout_f1": 0.0,
            "heldout_wrong": 0.0, "golden_loss": 1.0, "pref_accuracy": None}
    return {"heldout_examples": 0, "candidate": {**base, **cand}, "parent": {**base, **parent},
            **top}


def test_a_votes_only_candidate_is_judged_on_held_out_votes() -> None:
    liked = [True] * 6 + [False] * 6
    rising = report({"vote_logps": [-1.0, -1.1, -0.9, -1.2, -1.0, -0.8] + [-3.0] * 6,
                     "vote_margin": 2.0},
                    {"vote_logps": [-2.0] * 12, "vote_margin": 0.0},
                    heldout_votes=12, heldout_vote_labels=liked)
    assert gate(rising, GatePolicy()) == []
    # the same answers under shuffled labels: the liked ones gain no more than the disliked
    mixed = [True, False] * 6
    shuffled = {**rising, "heldout_vote_labels": mixed}
    assert any("vote margin" in r for r in gate(shuffled, GatePolicy()))
    # too few held-out votes: no evidence, rejected as before
    assert any("held-out examples" in r for r in gate({**rising, "heldout_votes": 2},
                                                      GatePolicy()))
    # the golden set still holds
    worse = {**rising, "candidate": {**rising["candidate"], "golden_loss": 1.5}}
    assert any("golden-set" in r for r in gate(worse, GatePolicy()))


def test_held_out_hand_off_pairs_must_be_preferred_more_often_than_before() -> None:
    common = {"heldout_loss": 1.0, "heldout_accuracy": 1.0, "heldout_f1": 0.9}
    ok = report({**common, "pair_accuracy": 0.8}, {**common, "heldout_loss": 2.0,
                                                   "heldout_accuracy": 0.0,
                                                   "pair_accuracy": 0.3}, heldout_examples=5)
    assert gate(ok, GatePolicy()) == []
    same = {**ok, "candidate": {**ok["candidate"], "pair_accuracy": 0.3}}
    assert any("hand-off pairs" in r for r in gate(same, GatePolicy()))


def test_the_hand_off_rate_vetoes_a_promotion() -> None:
    fine, many = Votes(200, 4), Votes(200, 60)
    assert decide_with_handoffs(Decision.PROMOTE, fine, fine, POLICY) == Decision.PROMOTE
    assert decide_with_handoffs(Decision.PROMOTE, many, fine, POLICY) == Decision.ROLLBACK
    assert decide_with_handoffs(Decision.WAIT, many, fine, POLICY) == Decision.ROLLBACK
    assert decide_with_handoffs(Decision.PROMOTE, Votes(5, 0), fine, POLICY) == Decision.WAIT


async def test_a_canary_that_sends_more_people_to_humans_is_not_promoted(  # type: ignore[no-untyped-def]
        sessions, tokenizer) -> None:
    await add(sessions, "fb-v1", AdapterStatus.ACTIVE)
    await add(sessions, "fb-v2", AdapterStatus.CANARY, parent="fb-v1")
    await _simulate(sessions, tokenizer, canary_down=0.1, active_down=0.2)  # votes: promote
    async with sessions() as s:
        served = (await s.execute(select(Message.conversation_id).where(
            Message.role == Role.ASSISTANT, Message.adapter == "fb-v2"))).scalars().all()
    for i, conversation in enumerate(served):
        if i % 3 == 0:  # a third of the canary's answers end with a person
            async with sessions() as s:
                row, _ = await handoff_store.request(
                    s, conversation_id=conversation, channel="test", chat_id=str(conversation),
                    thread_id="", user_id="u", reason="button")
                await handoff_store.close(s, handoff_id=row.id, by="test")
    outcome = await evaluate_canary(sessions, POLICY, rules=RULES)
    assert outcome.decision == Decision.ROLLBACK
    assert outcome.canary_handoffs is not None and outcome.canary_handoffs.down > 10
    assert outcome.control_handoffs is not None and outcome.control_handoffs.down == 0
    assert (await statuses(sessions))["fb-v2"] == "rejected"


async def test_a_votes_only_run_is_trained_and_judged_on_held_out_votes(  # type: ignore[no-untyped-def]
        sessions, tokenizer, tmp_path: Path, model_dir: Path) -> None:
    """No correction anywhere: a share of the voted conversations is held out for the gate,
    and the run trains instead of being skipped for lack of held-out corrections."""
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    for i in range(24):
        answer = await users.ask(f"Do you ship to region {i}?")
        await core.vote(answer_id=answer, voter_id=REVIEWER, rating=1 if i % 2 else -1,
                        source="test")
    cfg = loop_config(tmp_path, model_dir, fake="pass 0",
                      dataset=DatasetPolicy(heldout_percent=50, heldout_votes_percent=50,
                                            system_prompt="Be brief."))
    result = await run_cycle(sessions, ScriptedBackend(), cfg, trigger="test")
    assert result.status == "succeeded", result.reasons
    work = cfg.runs_dir / f"run-{result.run_id}"
    held = [json.loads(line) for line in (work / "heldout_votes.jsonl").read_text().splitlines()]
    assert {v["label"] for v in held} == {True, False} and len(held) >= 4
    trained = {e["answer_id"] for f in ("sft.jsonl", "kto.jsonl")
               for e in map(json.loads, (work / f).read_text().splitlines())}
    assert not trained & {v["answer_id"] for v in held}  # never trained on what judges it
    assert result.metrics is not None and result.metrics["dataset"]["heldout_votes"] == len(held)


async def test_votes_without_held_out_votes_skip_the_run_and_say_why(  # type: ignore[no-untyped-def]
        sessions, tokenizer, tmp_path: Path, model_dir: Path) -> None:
    core = make_core(sessions, tokenizer)
    for i in range(20):
        answer = await Asker(core).ask(f"Do you ship to island {i}?")
        await core.vote(answer_id=answer, voter_id=REVIEWER, rating=1 if i % 2 else -1,
                        source="test")
    cfg = loop_config(tmp_path, model_dir, fake="pass 0",
                      dataset=DatasetPolicy(heldout_votes_percent=0, system_prompt="Be brief."))
    skipped = await run_cycle(sessions, ScriptedBackend(), cfg, trigger="test")
    assert skipped.status == "skipped" and "held-out votes" in skipped.reasons[0]
