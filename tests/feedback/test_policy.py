"""The dataset policy and the dataset's assembly, on rows built here: no database."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from feedback.assemble import assemble, prompts
from feedback.examples import Example, dedupe, replay_sample
from feedback.policy import (
    DatasetPolicy,
    is_new,
    judge_votes,
    select_feedback,
    split_conversations,
)
from feedback.redaction import Redactor
from storage.feedback import FeedbackRow, TranscriptMessage

POLICY = DatasetPolicy(heldout_percent=0, system_prompt="Be brief.")
REDACT = Redactor()
NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
OLD = {f"u{i}": NOW - timedelta(days=30) for i in range(10)} | {"reviewer": NOW - timedelta(90)}


def fb(id: int, answer: int, voter: str, *, rating: int | None = None,
       correction: str | None = None, trusted: bool = False, review: str | None = None,
       at: datetime = NOW, conversation: int | None = None) -> FeedbackRow:
    """Feedback `id` by `voter` on answer `answer` (to question `answer - 1`)."""
    if correction is not None and review is None:
        review = "approved" if trusted else "pending"
    return FeedbackRow(id, answer, voter, rating, correction, trusted, review, at,
                       conversation if conversation is not None else answer, f"answer {answer}",
                       answer - 1, f"question {answer}?")


def labels(rows: list[FeedbackRow], first_seen=OLD, policy=POLICY) -> dict[int, bool]:  # type: ignore[no-untyped-def]
    return select_feedback(rows, first_seen, policy).labels


def test_thumbs_need_distinct_voters_or_a_trusted_one() -> None:
    rows = [fb(1, 10, "u1", rating=1),  # one voter: no label
            fb(2, 20, "u1", rating=1), fb(3, 20, "u2", rating=1),  # two: liked
            fb(4, 30, "reviewer", rating=-1, trusted=True), fb(5, 30, "u3", rating=1)]
    assert labels(rows) == {20: True, 30: False}  # the reviewer's 3 outweighs one user's 1
    assert labels(rows, policy=replace(POLICY, min_voters=1)) == {10: True, 20: True, 30: False}
    tied = [fb(1, 10, "u1", rating=1), fb(2, 10, "u2", rating=-1)]
    assert labels(tied) == {}  # no net opinion


def test_new_voters_weigh_less_and_a_trusted_voter_is_never_new() -> None:
    fresh = {"n1": NOW - timedelta(days=1), "n2": NOW - timedelta(days=2)}
    rows = [fb(1, 10, "u1", rating=1), fb(2, 10, "n1", rating=-1), fb(3, 10, "n2", rating=-1)]
    assert labels(rows, OLD | fresh) == {}  # 1 - 0.5 - 0.5
    assert labels(rows[:2] + [fb(3, 10, "n2", rating=-1), fb(4, 10, "n3", rating=-1)],
                  OLD | fresh) == {10: False}  # a voter never seen before is new too
    trusted_newcomer = fb(5, 10, "r2", rating=1, trusted=True)
    assert not is_new(trusted_newcomer, {"r2": NOW}, POLICY)
    assert is_new(fb(6, 10, "n1", rating=1), fresh, POLICY)
    assert not is_new(fb(7, 10, "n1", rating=1, at=NOW + timedelta(days=8)), fresh, POLICY)


def test_the_per_user_cap_keeps_each_voters_first_rows_and_all_trusted_ones() -> None:
    rows = [fb(i, 10 * i, "spammer", rating=1) for i in range(1, 6)]
    rows += [fb(10 + i, 10 * i, "reviewer", rating=1, trusted=True) for i in range(1, 6)]
    chosen = select_feedback(rows, OLD, replace(POLICY, per_user_cap=2))
    assert [r.id for r in chosen.rows] == [1, 2, 11, 12, 13, 14, 15]
    assert (chosen.total, chosen.capped) == (10, 3)


def test_a_burst_of_new_voters_is_quarantined_and_the_regulars_still_count() -> None:
    policy = replace(POLICY, burst_min_votes=5, burst_new_share=0.6)
    regulars = [fb(i, 10, f"u{i}", rating=1, at=NOW - timedelta(hours=1)) for i in range(3)]
    burst = [fb(10 + i, 10, f"fresh{i}", rating=-1, at=NOW + timedelta(seconds=i))
             for i in range(8)]
    first_seen = OLD | {f"fresh{i}": NOW for i in range(8)}
    chosen = select_feedback(regulars + burst, first_seen, policy)
    assert chosen.quarantined == {r.id for r in burst}
    assert chosen.labels == {10: True}
    spread = [replace(r, created_at=NOW + timedelta(hours=r.id)) for r in burst]
    assert select_feedback(regulars + spread, first_seen, policy).quarantined == frozenset()


def test_only_approved_corrections_are_training_labels() -> None:
    rows = [fb(1, 10, "reviewer", correction="45 days.", trusted=True),
            fb(2, 20, "u1", correction="Maybe."),
            fb(3, 30, "u2", correction="Rejected.", review="rejected"),
            fb(4, 40, "u3", correction="Approved later.", review="approved")]
    assert [r.id for r in select_feedback(rows, OLD, POLICY).corrections] == [1, 4]


def test_split_per_answer_holds_out_some_never_all() -> None:
    policy = replace(POLICY, heldout_percent=20)
    pair = split_conversations([(1, "Same answer."), (2, "same answer")], [1, 2], {}, policy)
    assert sorted(pair.values()) == [False, True]  # "at least one": one of two
    assert sum(split_conversations([(c, "A.") for c in range(10)], range(10), {},
                                   policy).values()) == 2
    everything = replace(policy, heldout_percent=100)
    assert sorted(split_conversations([(c, "A.") for c in range(4)], range(4), {},
                                      everything).values()) == [False, True, True, True]
    assert not any(split_conversations([(c, "A.") for c in range(4)], range(4), {},
                                       replace(policy, heldout_percent=0)).values())
    # recorded decisions count: two already held out of five, none more
    decided = {0: True, 1: True}
    split = split_conversations([(c, "A.") for c in range(5)], range(5), decided, policy)
    assert split == {0: True, 1: True, 2: False, 3: False, 4: False}
    # a conversation's first correction decides its answer; an answer of its own and votes
    # alone are trained on, whatever the hash says
    alone = split_conversations([(7, "Unique."), (7, "A.")], [7, 8], {},
                                replace(policy, heldout_percent=100))
    assert alone == {7: False, 8: False}


def test_split_holds_out_a_fifth_of_a_teams_corrections_spread_over_answers() -> None:
    """Fifteen answers corrected twice each (two phrasings): 20 % of the thirty, one per
    answer at most, not one of every pair (half of them)."""
    corrections = [(c, f"Answer {c // 2}.") for c in range(30)]
    split = split_conversations(corrections, range(30), {}, replace(POLICY, heldout_percent=20))
    held = [c for c, h in split.items() if h]
    assert len(held) == 6
    assert len({c // 2 for c in held}) == 6  # six different answers
    # a later batch adds to what is held out, to a fifth of everything shared
    more = [(c, f"Answer {c % 15}.") for c in range(30, 45)]
    again = split_conversations(corrections + more, range(45), split,
                                replace(POLICY, heldout_percent=20))
    assert {c for c in held} <= {c for c, h in again.items() if h}


def _msg(id: int, role: str, text: str, status: str | None = None) -> TranscriptMessage:
    return TranscriptMessage(id, role, text, id - 1 if role == "assistant" else None,
                             status or ("ok" if role == "assistant" else None))


def test_prompts_keep_recent_answered_turns_within_the_budget() -> None:
    words = " word" * 20
    transcript = [_msg(1, "user", "earlier 0" + words), _msg(2, "assistant", "answer 0"),
                  _msg(3, "user", "failed question"), _msg(4, "assistant", "", "failed"),
                  _msg(5, "user", "earlier 1" + words), _msg(6, "assistant", "answer 1"),
                  _msg(7, "user", "Mail bob@example.com?"), _msg(8, "assistant", "answer 2")]
    row = replace(fb(1, 8, "u1", rating=1), question="Mail bob@example.com?", question_id=7)

    def prompt(budget: int) -> list[dict[str, str]]:
        policy = replace(POLICY, context_tokens=budget)
        return prompts([row], {8: transcript}, REDACT, policy, lambda t: len(t.split()))[8]

    wide = prompt(1000)
    assert [m["role"] for m in wide] == ["system", "user", "assistant", "user", "assistant",
                                         "user"]
    assert "failed question" not in str(wide)
    assert wide[-1]["content"] == "Mail [EMAIL]?"
    # room for "answer 1" and its question, but not for "answer 0" (whose question is cut)
    assert [m["content"][:9] for m in prompt(30)] == ["Be brief.", "earlier 1", "answer 1",
                                                      "Mail [EMA"]
    # room for "answer 1" alone: an answer whose question was cut never comes first
    assert [m["role"] for m in prompt(5)] == ["system", "user"]


def test_assemble_puts_corrections_by_split_and_liked_answers_in_sft() -> None:
    rows = [fb(1, 10, "reviewer", correction="Ten.", trusted=True),  # trained on
            fb(2, 20, "reviewer", correction="Twenty.", trusted=True),  # held out
            fb(3, 30, "u1", rating=1), fb(4, 30, "u2", rating=1),  # liked
            fb(5, 10, "u3", rating=-1), fb(6, 10, "u4", rating=-1)]  # corrected: not a vote
    chosen = select_feedback(rows, OLD, POLICY)
    chats = {a: [{"role": "user", "content": f"question {a}?"}] for a in (10, 20, 30)}
    ds = assemble(chosen, prompts=chats, heldout={10: False, 20: True, 30: False},
                  redactor=REDACT, policy=POLICY, carried={10})
    assert [(e.answer_id, e.source, e.completion, e.rejected) for e in ds.sft] == [
        (10, "correction", "Ten.", "answer 10"), (30, "liked", "answer 30", None)]
    assert [(e.answer_id, e.label) for e in ds.kto] == [(10, True), (10, False), (30, True)]
    assert [e.completion for e in ds.heldout] == ["Twenty."]
    assert ds.report["labelled_answers"] == 2
    assert {k: ds.report[k] for k in ("corrections_trained", "corrections_heldout",
                                      "corrections_carried_over")} == {
        "corrections_trained": 1, "corrections_heldout": 1, "corrections_carried_over": 1}
    assert ds.consumed == {1: (1, "trained"), 2: (1, "heldout"), 3: (1, "trained"),
                           4: (1, "trained"), 5: (1, "unused"), 6: (1, "unused")}
    no_liked = assemble(chosen, prompts=chats, heldout={10: False, 20: True, 30: False},
                        redactor=REDACT, policy=replace(POLICY, include_liked=False))
    assert [e.source for e in no_liked.sft] == ["correction"]
    assert no_liked.report["corrections_carried_over"] == 0


def test_every_row_read_gets_the_role_the_run_gave_it() -> None:
    policy = replace(POLICY, per_user_cap=1, burst_min_votes=3)
    rows = [fb(1, 10, "u1", rating=1), fb(2, 10, "u2", rating=1),  # a label: trained
            fb(3, 20, "u1", rating=1),  # u1's second row: over the cap
            fb(4, 30, "u3", rating=1),  # a lone vote: no label
            fb(5, 40, "u4", correction="Maybe."),  # pending
            fb(6, 50, "u5", rating=1, conversation=99)]  # in a held-out conversation
    burst = [fb(7 + i, 60, f"n{i}", rating=-1, at=NOW + timedelta(days=1))
             for i in range(3)]  # new voters, all at once
    chosen = select_feedback(rows + burst, OLD, policy)
    chats = {r.answer_id: [{"role": "user", "content": r.question}] for r in rows + burst}
    heldout = {r.conversation_id: r.conversation_id == 99 for r in rows + burst}
    ds = assemble(chosen, prompts=chats, heldout=heldout, redactor=REDACT, policy=policy)
    assert {i: role for i, (_, role) in ds.consumed.items()} == {
        1: "trained", 2: "trained", 3: "capped", 4: "unused", 5: "unused", 6: "heldout",
        7: "quarantined", 8: "quarantined", 9: "quarantined"}


def test_a_users_vote_and_approved_correction_are_one_row_trained_on_for_the_correction(
        ) -> None:
    """A burst of new users' 👎 is quarantined, but the corrections they suggested and a
    reviewer approved (on the same rows) are training data, and recorded so."""
    policy = replace(POLICY, burst_min_votes=3)
    rows = [fb(i, 10 * i, f"n{i}", rating=-1, correction=f"Fix {i}.", review="approved")
            for i in range(1, 5)]
    chosen = select_feedback(rows, OLD, policy)
    assert chosen.quarantined == {1, 2, 3, 4} and len(chosen.corrections) == 4
    chats = {r.answer_id: [{"role": "user", "content": r.question}] for r in rows}
    heldout = {r.conversation_id: r.id == 4 for r in rows}
    ds = assemble(chosen, prompts=chats, heldout=heldout, redactor=REDACT, policy=policy)
    assert [e.completion for e in ds.sft] == ["Fix 1.", "Fix 2.", "Fix 3."]
    assert {i: role for i, (_, role) in ds.consumed.items()} == {
        1: "trained", 2: "trained", 3: "trained", 4: "heldout"}
    assert (ds.report["corrections_trained"], ds.report["corrections_heldout"]) == (3, 1)


def test_a_learned_correction_is_not_trained_again_and_still_rules_out_a_vote_label() -> None:
    learned = replace(fb(1, 10, "reviewer", correction="Ten.", trusted=True), fresh=False)
    votes = [replace(fb(2, 10, "u1", rating=1), revision=3), fb(3, 10, "u2", rating=1)]
    chosen = select_feedback([learned, *votes], OLD, POLICY)
    assert chosen.corrections == [] and chosen.corrected == {10}
    ds = assemble(chosen, prompts={10: [{"role": "user", "content": "question 10?"}]},
                  heldout={10: False}, redactor=REDACT, policy=POLICY)
    assert ds.sft == ds.kto == [] and ds.consumed[2] == (3, "unused")


def test_web_votes_weigh_what_the_setting_says() -> None:
    seen = OLD | {"web:a": NOW - timedelta(days=30), "web:b": NOW - timedelta(days=30)}
    web = [replace(fb(1, 10, "web:a", rating=1), source="web"),
           replace(fb(2, 10, "web:b", rating=1), source="web")]
    assert labels(web, seen) == {}  # weight 0: two web identities make no label
    assert labels(web, seen, replace(POLICY, web_vote_weight=1.0)) == {10: True}
    prefixed = [replace(r, source="") for r in web]  # known as web by the identity alone
    assert labels(prefixed, seen) == {}
    # a web vote of weight 0 is no voter: with a regular's vote, still one voter
    assert labels([*web, fb(3, 10, "u1", rating=-1)], seen) == {}
    # half weight: the web voters' 👍 and a regular's 👎 cancel out
    mixed = [*web, fb(3, 10, "u1", rating=-1)]
    assert labels(mixed, seen, replace(POLICY, web_vote_weight=0.5)) == {}
    assert labels(mixed, seen, replace(POLICY, web_vote_weight=1.0)) == {10: True}
    reviewer = replace(fb(4, 10, "reviewer", rating=-1, trusted=True), source="web")
    assert labels([*web, reviewer], seen) == {10: False}  # a trusted vote weighs as trusted


def test_the_canary_and_the_dataset_judge_votes_by_one_rule() -> None:
    rows = [fb(1, 10, "u1", rating=1), fb(2, 10, "u2", rating=-1), fb(3, 10, "u3", rating=-1),
            fb(4, 20, "u1", rating=1), fb(5, 30, "u4", rating=1)]
    verdicts = judge_votes(rows, OLD, POLICY)
    assert verdicts.labels == select_feedback(rows, OLD, POLICY).labels == {10: False}
    assert verdicts.counted == {1, 2, 3}


def _ex(i: int, question: str | None = None, answer: str | None = None) -> Example:
    return Example(i, i, [{"role": "user", "content": question or f"q{i}"}], answer or f"a{i}",
                   "correction")


def test_near_duplicates_are_removed() -> None:
    same = [_ex(1, "What are your store hours?", "9am to 6pm."),
            _ex(2, "what are your store hours", "9am to 6pm."),
            _ex(3, "When do your shops open on Sundays?", "9am to 6pm.")]
    assert [e.answer_id for e in dedupe(same, 0.9)] == [1, 3]
    labelled = [replace(same[0], label=True), replace(same[1], label=False)]
    assert dedupe(labelled, 0.9) == labelled  # opposite labels are not duplicates


def test_replay_sample_is_deterministic_and_excludes_new_examples() -> None:
    pool = [_ex(i) for i in range(20)]
    new = [_ex(0), _ex(1), _ex(2), _ex(3)]
    a = replay_sample(pool, new, 0.5, seed=7)
    assert a == replay_sample(pool, new, 0.5, seed=7) and len(a) == 2
    assert all(e.source == "replay" and e.answer_id >= 4 for e in a)
    assert replay_sample(pool, new, 0.5, seed=8) != a


def test_a_reviewer_repeating_an_approved_answer_keeps_the_companys_number() -> None:
    """The number in a memory answer is the company's: a correction repeating it is trained as
    written. The same number in an answer the model wrote may be a customer's echoed back: the
    correction is not trained to say the placeholder."""
    support = "Call us on 0800 414 7782, option 2."
    answer = replace(fb(1, 10, "reviewer", rating=-1, correction=support, trusted=True),
                     answer=support)
    chats = {10: [{"role": "user", "content": "question 10?"}]}

    def trained(row: FeedbackRow, quoted: dict[int, list[str]] | None = None) -> list[str]:
        chosen = select_feedback([row], OLD, POLICY)
        ds = assemble(chosen, prompts=chats, heldout={10: False}, redactor=REDACT,
                      policy=POLICY, quoted=quoted or {})
        return [ex.completion for ex in ds.sft]

    assert trained(replace(answer, from_memory=True)) == [support]
    assert trained(answer) == []
    # the model's answer repeating an approved answer its prompt quoted: the company's too
    assert trained(answer, quoted={10: [support]}) == [support]
