"""Selected feedback -> a Dataset: prompts from the conversations, splits, dedupe, replay,
and the role of every row read (what the run consumes).

Pure: `build_dataset` (feedback.dataset) reads the rows and records the splits; every text
is redacted here, and the result is deterministic for the same inputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any

from feedback.examples import Dataset, Example, dedupe, replay_sample
from feedback.policy import DatasetPolicy, Selection
from feedback.redaction import Redactor, company_voice, has_placeholder
from storage.feedback import FeedbackRow, TranscriptMessage
from storage.models import AnswerStatus, FeedbackRole, Role

TokenCounter = Callable[[str], int]
Chat = list[dict[str, str]]


def approx_tokens(text: str) -> int:
    return len(text) // 4 + 4


def prompts(rows: Sequence[FeedbackRow], transcripts: Mapping[int, Sequence[TranscriptMessage]],
            redactor: Redactor, policy: DatasetPolicy, count: TokenCounter) -> dict[int, Chat]:
    """answer id -> redacted chat prompt: earlier turns (newest first, within budget) + question."""
    out: dict[int, Chat] = {}
    for r in rows:
        messages = transcripts.get(r.conversation_id, ())
        question = {"role": "user", "content": redactor(r.question)}
        budget = policy.context_tokens - count(question["content"])
        earlier: Chat = []
        failed = {m.reply_to_id for m in messages if m.status == AnswerStatus.FAILED}
        for m in reversed(messages):
            if m.id >= r.question_id:
                continue
            if m.status == AnswerStatus.FAILED or m.id in failed:
                continue
            text = redactor(m.text)
            budget -= count(text)
            if budget < 0:
                break
            earlier.insert(0, {"role": "user" if m.role == Role.USER else "assistant",
                               "content": text})
        if earlier and earlier[0]["role"] == "assistant":
            earlier = earlier[1:]  # never start with an answer whose question was cut
        system = [{"role": "system", "content": policy.system_prompt}]
        out[r.answer_id] = (system if policy.system_prompt else []) + earlier + [question]
    return out


def assemble(selection: Selection, *, prompts: Mapping[int, Chat], heldout: Mapping[int, bool],
             redactor: Redactor, policy: DatasetPolicy, replay_pool: Sequence[Example] = (),
             carried: Collection[int] = (), quoted: Mapping[int, Sequence[str]] = {}
             ) -> Dataset:
    """The dataset: approved corrections (SFT, a KTO pair, or held out with their
    conversation), labelled answers (KTO, and SFT if liked), deduplicated, plus replay.
    `carried`: conversations a passed run held out, trained on now; `quoted`: answer id ->
    the approved answers (company voice) its prompt quoted from the answer memory."""
    report: dict[str, Any] = {"feedback_rows": selection.total,
                              "quarantined_votes": len(selection.quarantined),
                              "capped_rows": selection.capped}
    ds = Dataset(report=report)
    report["placeholder_targets_dropped"] = 0
    for r in selection.corrections:
        # a trusted reviewer's answer is the company speaking (feedback.redaction); the answer
        # it corrects is the customer's side unless it was itself an approved answer, and
        # what it repeats of the approved answers it was shown is the company's
        customer = (r.question,) if r.from_memory else (r.question, r.answer)
        target = (company_voice(redactor, r.correction or "", customer,
                                quoted.get(r.answer_id, ()))
                  if r.trusted else redactor(r.correction or ""))
        ex = Example(r.conversation_id, r.answer_id, prompts[r.answer_id],
                     target, "correction", rejected=redactor(r.answer))
        if has_placeholder(target) and not heldout[ex.conversation_id]:
            # never train the model to say a placeholder: only what it should not have said
            report["placeholder_targets_dropped"] += 1
            ds.kto.append(Example(ex.conversation_id, ex.answer_id, ex.prompt,
                                  ex.rejected or "", "correction", label=False))
            continue
        if heldout[ex.conversation_id]:  # a hand-off's pair: the gate's pairwise accuracy
            ds.heldout.append(replace(ex, source="handoff") if r.source == "handoff" else ex)
            ds.heldout_feedback.setdefault(r.answer_id, []).append(r.id)
        else:
            ds.sft.append(ex)
            if r.source == "handoff":  # an agent's reply after a hand-off: a DPO pair too
                ds.dpo.append(Example(ex.conversation_id, ex.answer_id, ex.prompt,
                                      ex.completion, "handoff", rejected=ex.rejected))
            ds.kto.append(Example(ex.conversation_id, ex.answer_id, ex.prompt, ex.completion,
                                  "correction", label=True))
            ds.kto.append(Example(ex.conversation_id, ex.answer_id, ex.prompt,
                                  ex.rejected or "", "correction", label=False))
    report["labelled_answers"] = len(selection.labels)
    answers = {r.answer_id: r for r in selection.rows}
    labelled: set[int] = set()
    for answer_id, label in sorted(selection.labels.items()):
        answer = answers[answer_id]
        if answer_id in selection.corrected:
            continue
        if heldout[answer.conversation_id]:  # the gate's votes (a votes-only run)
            ds.heldout_votes.append(Example(answer.conversation_id, answer_id,
                                            prompts[answer_id], redactor(answer.answer),
                                            "vote", label=label))
            continue
        labelled.add(answer_id)
        ex = Example(answer.conversation_id, answer_id, prompts[answer_id],
                     redactor(answer.answer), "vote", label=label)
        ds.kto.append(ex)
        if label and policy.include_liked:
            ds.sft.append(Example(ex.conversation_id, answer_id, ex.prompt, ex.completion, "liked"))
    before = len(ds.sft)
    ds.sft = dedupe(ds.sft, policy.dedupe_jaccard)
    ds.kto = dedupe(ds.kto, policy.dedupe_jaccard)
    report["duplicates_removed"] = before - len(ds.sft)
    ds.consumed = roles(selection, heldout, labelled)
    replay = replay_sample(replay_pool, ds.sft, policy.replay_fraction,
                           seed=_seed(ds.consumed))
    ds.sft += replay
    report["dpo_pairs"] = len(ds.dpo)
    report["heldout_votes"] = len(ds.heldout_votes)
    report.update(sft=len(ds.sft), kto=len(ds.kto), heldout=len(ds.heldout), replay=len(replay),
                  **correction_counts(selection, ds.consumed, carried))
    return ds


def roles(selection: Selection, heldout: Mapping[int, bool], labelled: Collection[int]
          ) -> dict[int, tuple[int, str]]:
    """feedback id -> (revision, role) for every row read (a voter's vote and correction on
    an answer are one row): a new approved correction held out or trained on, whatever its
    vote; else quarantined, over the cap, held out with its conversation, trained on (a vote
    behind a label the dataset uses), or read without use."""
    kept = {r.id for r in selection.rows}
    corrections = {r.id for r in selection.corrections}
    out = {}
    for r in selection.read:
        held = heldout.get(r.conversation_id, False)
        role = (FeedbackRole.HELDOUT if r.id in corrections and held else
                FeedbackRole.TRAINED if r.id in corrections else
                FeedbackRole.QUARANTINED if r.id in selection.quarantined else
                FeedbackRole.CAPPED if r.id not in kept else
                FeedbackRole.HELDOUT if held else
                FeedbackRole.TRAINED if r.id in selection.counted and r.answer_id in labelled
                else FeedbackRole.UNUSED)
        out[r.id] = (r.revision, str(role))
    return out


def correction_counts(selection: Selection, consumed: Mapping[int, tuple[int, str]],
                      carried: Collection[int]) -> dict[str, int]:
    """How many approved corrections the run trains on, holds out, and carries over (trains
    on after an earlier run that passed held them out)."""
    def role(r: FeedbackRow) -> str:
        return consumed[r.id][1]

    trained = [r for r in selection.corrections if role(r) == FeedbackRole.TRAINED]
    return {"corrections_trained": len(trained),
            "corrections_heldout": sum(role(r) == FeedbackRole.HELDOUT
                                       for r in selection.corrections),
            "corrections_carried_over": sum(r.conversation_id in carried for r in trained)}


def _seed(consumed: Mapping[int, tuple[int, str]]) -> int:
    """The replay sample's seed: the same feedback revisions, the same sample."""
    blob = ",".join(f"{i}:{rev}" for i, (rev, _) in sorted(consumed.items()))
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big")
