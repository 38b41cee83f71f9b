"""Feedback -> training data: thumbs are candidates, reviewed corrections are the labels.

`build_dataset` reads the feedback a candidate has yet to learn (every revision the runs
it continues from did not settle: a correction approved late, a changed vote, a voter
reaching the quorum) and returns SFT examples (trusted corrections, optionally liked
answers), binary-labelled KTO examples (answers whose weighted vote counts), a held-out
split chosen by conversation, a replay sample of earlier training data, and the role of
every row read (what the run consumes). A conversation's split is recorded the first time
it has data; held out by a run that passes, it is trained on by the next run that has new
data to hold out instead (until then it stays the gate's). So the gate judges only what no
candidate trained on, and nothing is held out for ever.
Every text is redacted first; the dataset hash is deterministic.

It only composes: rows from `storage.feedback`, the policy (`feedback.policy`), the
examples (`feedback.assemble`), and the split decisions recorded back through storage.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from feedback.assemble import TokenCounter, approx_tokens, assemble, prompts
from feedback.examples import Dataset, Example, dedupe, read_examples, replay_sample, write_jsonl
from feedback.policy import (
    DatasetPolicy,
    heldout_conversation,
    select_feedback,
    split_conversations,
)
from feedback.redaction import Redactor, entry_voice
from storage import feedback as store
from storage import memory as memory_store
from storage import privacy
from storage.feedback import FeedbackRow

__all__ = ["Dataset", "DatasetPolicy", "Example", "TokenCounter", "approx_tokens",
           "build_dataset", "dedupe", "heldout_conversation", "read_examples", "replay_sample",
           "split_conversations", "write_jsonl"]


async def build_dataset(
    session: AsyncSession, *, policy: DatasetPolicy, redactor: Redactor,
    learned_by: Collection[int] = (), replay_pool: Sequence[Example] = (),
    count_tokens: TokenCounter = approx_tokens,
) -> Dataset:
    """Build the dataset from the feedback the runs `learned_by` (the runs behind the adapter
    the candidate continues from; none for the base model) have not settled, plus a replay
    sample of `replay_pool`; records the splits it decides and, given new held-out data,
    releases the held-out conversations of passed runs into training (and commits)."""
    rows = await store.unlearned_feedback(session, learned_by=learned_by)
    rows = await privacy.without_forgotten(session, rows)  # forgotten people who wrote again
    first_seen = await store.first_seen(session, voters={r.voter_id for r in rows})
    selection = select_feedback(rows, first_seen, policy)
    conversations = {r.conversation_id for r in selection.rows}
    transcripts = await store.transcripts(session, conversation_ids=conversations)
    gone = await privacy.forgotten_messages(session, conversation_ids=conversations)
    transcripts = {c: [m for m in ms if m.id not in gone] for c, ms in transcripts.items()}
    answers = {r.answer_id: r.conversation_id for r in selection.rows}
    used = {r.conversation_id for r in selection.corrections} | {
        answers[a] for a in selection.labels}
    passed = await store.passed_heldout(session, conversation_ids=conversations)
    heldout = await _splits(session, conversations, used, passed, selection.corrections, policy)
    if any(heldout[r.conversation_id] for r in selection.corrections) or any(
            heldout[answers[a]] for a in selection.labels):
        # new data for the gate (`passed` counted as trained on above): carry the old over
        await store.release_heldout(session, conversation_ids=passed)
    else:  # nothing new to judge on (a retrain from the base): they stay held out for now
        heldout.update(await store.recorded_splits(session, conversation_ids=passed))
    carried = {c for c in passed if not heldout[c]}
    return assemble(selection, prompts=prompts(selection.rows, transcripts, redactor, policy,
                                               count_tokens),
                    heldout=heldout, redactor=redactor, policy=policy, replay_pool=replay_pool,
                    carried=carried, quoted=await _quoted(session, selection.corrections,
                                                          redactor))


async def _quoted(session: AsyncSession, corrections: Sequence[FeedbackRow],
                  redactor: Redactor) -> dict[int, list[str]]:
    """answer id -> the approved answers the corrected answer's prompt quoted from the answer
    memory (trusted corrections only), each in the company's voice (its own question and
    context the customer's side): what the model repeated of them is the company's, not the
    customer's. An entry erased since (`forget`) quotes nothing."""
    wanted = {r.answer_id: r.memory_refs for r in corrections if r.trusted and r.memory_refs}
    found = await memory_store.rows(session, ids={i for ids in wanted.values() for i in ids})
    voice = {e.id: entry_voice(redactor, e) for e in found}
    return {a: [voice[i] for i in ids if i in voice] for a, ids in wanted.items()}


async def _splits(session: AsyncSession, conversations: Collection[int], used: Collection[int],
                  passed: Collection[int], corrections: Sequence[FeedbackRow],
                  policy: DatasetPolicy) -> dict[int, bool]:
    """The conversations' splits: recorded ones kept, those `used` (with data for this
    dataset) for the first time decided and recorded (a concurrent builder's decision wins),
    so a conversation moves only from held out to trained on (store.release_heldout), never
    back. The `passed` ones (held out by a run that passed) count as trained on, so new
    held-out data is drawn from what is new. The others stay undecided, to be drawn when
    their data comes (a correction approved late can be held out); nothing of theirs is
    trained on meanwhile (False here)."""
    decided = await store.recorded_splits(session, conversation_ids=conversations)
    carried = {c: False for c in passed}
    split = split_conversations([(r.conversation_id, r.correction or "") for r in corrections],
                                sorted(used), {**decided, **carried}, policy)
    new = {c: h for c, h in split.items() if c not in decided and c not in carried}
    if new:
        await store.record_splits(session, splits=new)
        decided = await store.recorded_splits(session, conversation_ids=conversations)
    return {c: False if c in carried else decided.get(c, False) for c in conversations}
