"""Feedback -> training data: thumbs are candidates, reviewed corrections are the labels.

`build_dataset` reads the feedback that arrived after a watermark and returns
SFT examples (trusted corrections, optionally liked answers), binary-labelled
KTO examples (answers whose weighted vote counts), a held-out split chosen by
conversation (recorded the first time, so stable across runs), and a replay
sample of earlier training data. Every text is redacted first; the dataset hash
is deterministic.

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
from feedback.redaction import Redactor
from storage import feedback as store
from storage.feedback import FeedbackRow

__all__ = ["Dataset", "DatasetPolicy", "Example", "TokenCounter", "approx_tokens",
           "build_dataset", "dedupe", "heldout_conversation", "read_examples", "replay_sample",
           "split_conversations", "write_jsonl"]


async def build_dataset(
    session: AsyncSession, *, policy: DatasetPolicy, redactor: Redactor, since: int = 0,
    replay_pool: Sequence[Example] = (), count_tokens: TokenCounter = approx_tokens,
) -> Dataset:
    """Build the dataset from feedback with id > `since` plus a replay sample of `replay_pool`;
    records the split of each conversation it uses for the first time (and commits)."""
    rows = await store.feedback_since(session, since=since)
    first_seen = await store.first_seen(session, voters={r.voter_id for r in rows})
    selection = select_feedback(rows, first_seen, policy)
    conversations = {r.conversation_id for r in selection.rows}
    transcripts = await store.transcripts(session, conversation_ids=conversations)
    heldout = await _splits(session, conversations, selection.corrections, policy)
    return assemble(selection, prompts=prompts(selection.rows, transcripts, redactor, policy,
                                               count_tokens),
                    heldout=heldout, redactor=redactor, policy=policy, replay_pool=replay_pool,
                    since=since)


async def _splits(session: AsyncSession, conversations: Collection[int],
                  corrections: Sequence[FeedbackRow], policy: DatasetPolicy) -> dict[int, bool]:
    """The conversations' splits: recorded ones kept, new ones decided and recorded (a
    concurrent builder's decision wins), so a conversation never moves between splits."""
    decided = await store.recorded_splits(session, conversation_ids=conversations)
    split = split_conversations([(r.conversation_id, r.correction or "") for r in corrections],
                                sorted(conversations), decided, policy)
    new = {c: h for c, h in split.items() if c not in decided}
    if not new:
        return split
    await store.record_splits(session, splits=new)
    return await store.recorded_splits(session, conversation_ids=conversations)
