"""Selected feedback -> a Dataset: prompts from the conversations, splits, dedupe, replay.

Pure: `build_dataset` (feedback.dataset) reads the rows and records the splits; every text
is redacted here, and the result is deterministic for the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from feedback.examples import Dataset, Example, dedupe, replay_sample
from feedback.policy import DatasetPolicy, Selection
from feedback.redaction import Redactor
from storage.feedback import FeedbackRow, TranscriptMessage
from storage.models import AnswerStatus, Role

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
             since: int = 0) -> Dataset:
    """The dataset: approved corrections (SFT, a KTO pair, or held out with their
    conversation), labelled answers (KTO, and SFT if liked), deduplicated, plus replay."""
    report: dict[str, Any] = {"feedback_rows": selection.total,
                              "quarantined_votes": len(selection.quarantined),
                              "capped_rows": selection.capped}
    ds = Dataset(watermark=max((r.id for r in selection.rows), default=since), report=report)
    corrected: set[int] = set()
    for r in selection.corrections:
        ex = Example(r.conversation_id, r.answer_id, prompts[r.answer_id],
                     redactor(r.correction or ""), "correction", rejected=redactor(r.answer))
        corrected.add(ex.answer_id)
        if heldout[ex.conversation_id]:
            ds.heldout.append(ex)
        else:
            ds.sft.append(ex)
            ds.kto.append(Example(ex.conversation_id, ex.answer_id, ex.prompt, ex.completion,
                                  "correction", label=True))
            ds.kto.append(Example(ex.conversation_id, ex.answer_id, ex.prompt,
                                  ex.rejected or "", "correction", label=False))
    report["labelled_answers"] = len(selection.labels)
    answers = {r.answer_id: r for r in selection.rows}
    for answer_id, label in sorted(selection.labels.items()):
        answer = answers[answer_id]
        if answer_id in corrected or heldout[answer.conversation_id]:
            continue
        ex = Example(answer.conversation_id, answer_id, prompts[answer_id],
                     redactor(answer.answer), "vote", label=label)
        ds.kto.append(ex)
        if label and policy.include_liked:
            ds.sft.append(Example(ex.conversation_id, answer_id, ex.prompt, ex.completion, "liked"))
    before = len(ds.sft)
    ds.sft = dedupe(ds.sft, policy.dedupe_jaccard)
    ds.kto = dedupe(ds.kto, policy.dedupe_jaccard)
    report["duplicates_removed"] = before - len(ds.sft)
    replay = replay_sample(replay_pool, ds.sft, policy.replay_fraction, seed=ds.watermark)
    ds.sft += replay
    report.update(sft=len(ds.sft), kto=len(ds.kto), heldout=len(ds.heldout), replay=len(replay))
    return ds
