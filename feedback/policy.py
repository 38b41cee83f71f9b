"""The dataset policy (RELIABILITY.md section 2): which feedback counts, and how much.

Pure functions over the rows `storage.feedback` returns: trust weights (reviewers weigh
more, new accounts less), a per-user cap, a minimum of distinct voters, quarantine of
bursts of new voters (brigading), and the held-out split of conversations.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from storage.feedback import FeedbackRow
from storage.models import ReviewStatus


@dataclass(frozen=True)
class DatasetPolicy:
    """How feedback becomes data (RELIABILITY.md section 2)."""

    heldout_percent: int = 20
    split_salt: str = "chatloop-heldout-v1"
    min_voters: int = 2  # distinct voters before an answer's thumbs label counts
    trusted_weight: float = 3.0  # a reviewer's vote; a trusted vote alone is enough
    new_voter_weight: float = 0.5
    new_voter_age: timedelta = timedelta(days=7)
    per_user_cap: int = 50  # feedback rows one voter may contribute to one run
    burst_window: timedelta = timedelta(minutes=10)
    burst_min_votes: int = 10  # new-voter votes in one window that look like brigading
    burst_new_share: float = 0.6
    include_liked: bool = True
    dedupe_jaccard: float = 0.9
    context_tokens: int = 512
    replay_fraction: float = 0.5
    system_prompt: str = ""


@dataclass(frozen=True)
class Selection:
    """The feedback a dataset uses, and what the policy decided about it."""

    rows: list[FeedbackRow]  # within the per-user cap, in feedback order
    corrections: list[FeedbackRow]  # the approved corrections among them
    labels: dict[int, bool]  # answer id -> liked?, for answers whose weighted vote counts
    quarantined: frozenset[int]  # feedback ids of votes set aside as brigading
    total: int  # feedback rows before the cap

    @property
    def capped(self) -> int:
        return self.total - len(self.rows)


def select_feedback(rows: Sequence[FeedbackRow], first_seen: Mapping[str, datetime],
                    policy: DatasetPolicy) -> Selection:
    """Apply the policy to feedback rows (in feedback order); `first_seen`: when each voter
    was first active."""
    quarantined = quarantine(rows, first_seen, policy)
    kept = cap_per_user(rows, policy.per_user_cap)
    corrections = [r for r in kept if r.correction and r.review_status == ReviewStatus.APPROVED]
    return Selection(kept, corrections, vote_labels(kept, first_seen, quarantined, policy),
                     frozenset(quarantined), len(rows))


def is_new(row: FeedbackRow, first_seen: Mapping[str, datetime], policy: DatasetPolicy) -> bool:
    """Whether the voter was new when giving this feedback (a trusted one never is)."""
    if row.trusted:
        return False
    return row.created_at - first_seen.get(row.voter_id, row.created_at) < policy.new_voter_age


def quarantine(rows: Sequence[FeedbackRow], first_seen: Mapping[str, datetime],
               policy: DatasetPolicy) -> set[int]:
    """Feedback ids of new-voter votes, if some window holds a burst of them (else empty)."""
    votes = sorted((r for r in rows if r.rating is not None), key=lambda r: r.created_at)
    new = [r for r in votes if is_new(r, first_seen, policy)]
    for i, start in enumerate(new):
        end = start.created_at + policy.burst_window
        burst = [r for r in new[i:] if r.created_at <= end]
        total = sum(1 for r in votes if start.created_at <= r.created_at <= end)
        if len(burst) >= policy.burst_min_votes and len(burst) / total >= policy.burst_new_share:
            return {r.id for r in new}
    return set()


def cap_per_user(rows: Sequence[FeedbackRow], cap: int) -> list[FeedbackRow]:
    """The first `cap` rows of each voter (a trusted voter's all), in order."""
    used: dict[str, int] = defaultdict(int)
    kept = []
    for r in rows:
        if r.trusted or used[r.voter_id] < cap:
            used[r.voter_id] += 1
            kept.append(r)
    return kept


def vote_labels(rows: Sequence[FeedbackRow], first_seen: Mapping[str, datetime],
                quarantined: set[int] | frozenset[int], policy: DatasetPolicy) -> dict[int, bool]:
    """answer id -> liked?, for answers whose weighted vote has enough distinct voters."""
    score: dict[int, float] = defaultdict(float)
    voters: dict[int, set[str]] = defaultdict(set)
    trusted: set[int] = set()
    for r in rows:
        if r.rating is None or r.id in quarantined:
            continue
        weight = (policy.trusted_weight if r.trusted else
                  policy.new_voter_weight if is_new(r, first_seen, policy) else 1.0)
        score[r.answer_id] += weight * r.rating
        voters[r.answer_id].add(r.voter_id)
        if r.trusted:
            trusted.add(r.answer_id)
    return {a: s > 0 for a, s in score.items()
            if s != 0 and (a in trusted or len(voters[a]) >= policy.min_voters)}


# ---- the held-out split ----

_WORD = re.compile(r"\w+")


def _split_hash(conversation_id: int, policy: DatasetPolicy) -> int:
    digest = hashlib.sha256(f"{policy.split_salt}:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def heldout_conversation(conversation_id: int, policy: DatasetPolicy) -> bool:
    """The split of a conversation that shares no corrected answer with another."""
    return _split_hash(conversation_id, policy) < policy.heldout_percent


def split_conversations(corrections: Sequence[tuple[int, str]], conversations: Iterable[int],
                        decided: Mapping[int, bool], policy: DatasetPolicy) -> dict[int, bool]:
    """Held out (True) or trained on (False), for every conversation, keeping `decided`.

    `corrections` are (conversation, corrected answer) in feedback order; a conversation
    belongs to the answer of its first correction. Conversations whose answer several of them
    share (a reviewer's canned answer) are split per answer: `heldout_percent` of them
    rounded, at least one and never all, in hash order. So the gate tests unseen questions for
    answers the candidate was taught, and no answer loses all or most of its examples to the
    held-out split by chance. The rest (an answer of its own, votes only) by hash alone.
    """
    out = dict(decided)
    groups: dict[str, list[int]] = defaultdict(list)
    grouped: set[int] = set()
    for conversation, answer in corrections:
        if conversation not in grouped:
            grouped.add(conversation)
            groups[" ".join(_WORD.findall(answer.lower()))].append(conversation)
    for members in groups.values():
        if len(members) < 2:
            continue
        want = (min(len(members) - 1, max(1, round(len(members) * policy.heldout_percent / 100)))
                if policy.heldout_percent else 0)
        held = sum(out.get(c) is True for c in members)
        for c in sorted((c for c in members if c not in out),
                        key=lambda c: (_split_hash(c, policy), c)):
            out[c] = held < want
            held += out[c]
    for c in conversations:
        if c not in out:
            out[c] = heldout_conversation(c, policy)
    return out
