"""The dataset policy: which feedback counts, and how much.

Pure functions over the rows `storage.feedback` returns: trust weights (reviewers weigh
more, new accounts less, web votes as configured), a per-user cap, a minimum of distinct
voters, quarantine of bursts of new voters (brigading), and the held-out split of
conversations. `judge_votes` is the one rule every decision from votes uses: the dataset's
labels and the canary's verdict (feedback.canary).
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
    """How feedback becomes data, and how votes count (in the dataset and the canary)."""

    heldout_percent: int = 20
    # the share of conversations with votes only held out for the gate (by the split's hash):
    # a votes-only run is judged on them (feedback.evaluate.GatePolicy.min_heldout_votes)
    heldout_votes_percent: int = 20
    split_salt: str = "chatloop-heldout-v1"
    min_voters: int = 2  # distinct voters before an answer's thumbs label counts
    trusted_weight: float = 3.0  # a reviewer's vote; a trusted vote alone is enough
    new_voter_weight: float = 0.5
    new_voter_age: timedelta = timedelta(days=7)
    web_vote_weight: float = 0.0  # an untrusted web vote (anyone can open a browser); 0: none
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
class Verdicts:
    """What the votes on some answers say, under the policy."""

    kept: list[FeedbackRow]  # the rows within the per-user cap, in feedback order
    labels: dict[int, bool]  # answer id -> liked?, for answers whose weighted vote counts
    quarantined: frozenset[int]  # feedback ids of votes set aside as brigading
    counted: frozenset[int]  # feedback ids of the votes behind the labels


def judge_votes(rows: Sequence[FeedbackRow], first_seen: Mapping[str, datetime],
                policy: DatasetPolicy) -> Verdicts:
    """The one rule for every decision from votes: burst quarantine, the per-user cap, trust
    weights and the distinct-voter minimum, per answer (rows in feedback order)."""
    quarantined = frozenset(quarantine(rows, first_seen, policy))
    kept = cap_per_user(rows, policy.per_user_cap)
    labels = vote_labels(kept, first_seen, quarantined, policy)
    counted = frozenset(r.id for r in kept if r.rating is not None and r.answer_id in labels
                        and r.id not in quarantined and vote_weight(r, first_seen, policy) > 0)
    return Verdicts(kept, labels, quarantined, counted)


@dataclass(frozen=True)
class Selection:
    """The feedback a dataset uses, and what the policy decided about it."""

    rows: list[FeedbackRow]  # within the per-user cap, in feedback order
    corrections: list[FeedbackRow]  # the approved corrections among them not yet learned
    labels: dict[int, bool]  # answer id -> liked?, for answers whose weighted vote counts
    quarantined: frozenset[int]  # feedback ids of votes set aside as brigading
    read: tuple[FeedbackRow, ...] = ()  # every row read, before the cap
    corrected: frozenset[int] = frozenset()  # answers with an approved correction, any age
    counted: frozenset[int] = frozenset()  # feedback ids of the votes behind the labels

    @property
    def total(self) -> int:
        return len(self.read)

    @property
    def capped(self) -> int:
        return self.total - len(self.rows)


def select_feedback(rows: Sequence[FeedbackRow], first_seen: Mapping[str, datetime],
                    policy: DatasetPolicy) -> Selection:
    """Apply the policy to feedback rows (in feedback order); `first_seen`: when each voter
    was first active. Only fresh corrections are new training data; a learned one still
    marks its answer as corrected (no vote label for it)."""
    verdicts = judge_votes(rows, first_seen, policy)
    approved = [r for r in verdicts.kept
                if r.correction and r.review_status == ReviewStatus.APPROVED]
    return Selection(verdicts.kept, [r for r in approved if r.fresh], verdicts.labels,
                     verdicts.quarantined, tuple(rows),
                     frozenset(r.answer_id for r in approved), verdicts.counted)


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


def is_web(row: FeedbackRow) -> bool:
    """Whether the feedback came from the web chat (its source, or a `web:` identity)."""
    return row.source == "web" or row.voter_id.startswith("web:")


def vote_weight(row: FeedbackRow, first_seen: Mapping[str, datetime],
                policy: DatasetPolicy) -> float:
    """How much one vote counts: a reviewer's most, a new voter's less, an untrusted web
    vote `web_vote_weight` times as much (0: not at all)."""
    if row.trusted:
        return policy.trusted_weight
    weight = policy.new_voter_weight if is_new(row, first_seen, policy) else 1.0
    return weight * policy.web_vote_weight if is_web(row) else weight


def vote_labels(rows: Sequence[FeedbackRow], first_seen: Mapping[str, datetime],
                quarantined: set[int] | frozenset[int], policy: DatasetPolicy) -> dict[int, bool]:
    """answer id -> liked?, for answers whose weighted vote has enough distinct voters (a
    vote of weight 0 is no voter)."""
    score: dict[int, float] = defaultdict(float)
    voters: dict[int, set[str]] = defaultdict(set)
    trusted: set[int] = set()
    for r in rows:
        if r.rating is None or r.id in quarantined:
            continue
        weight = vote_weight(r, first_seen, policy)
        if weight <= 0:
            continue
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
    """Where a conversation falls in the split's hash order: in the first
    `heldout_percent` of it (only shared-answer conversations are ever held out)."""
    return _split_hash(conversation_id, policy) < policy.heldout_percent


def split_conversations(corrections: Sequence[tuple[int, str]], conversations: Iterable[int],
                        decided: Mapping[int, bool], policy: DatasetPolicy) -> dict[int, bool]:
    """Held out (True) or trained on (False), for every conversation, keeping `decided`.

    `corrections` are (conversation, corrected answer) in feedback order; a conversation
    belongs to the answer of its first correction. Only conversations whose answer several of
    them share (a reviewer's canned answer) are held out: `heldout_percent` of all of those,
    rounded (at least one), one per answer in the answers' hash order before a second of any,
    never all of an answer. So the gate tests unseen questions for answers the candidate was
    taught, and a team's corrections lose a fifth to the gate, not half (two phrasings per
    answer). A correction with an answer of its own is trained on: held out, it could only
    test a guess at an answer never taught (the gate then judges on rephrasings of trained
    questions, feedback.examples.rephrasings). Conversations with votes only are held out by
    the split's hash, `heldout_votes_percent` of them (the gate of a run without corrections
    judges on their votes), the rest trained on.
    """
    out = dict(decided)
    groups: dict[str, list[int]] = defaultdict(list)
    grouped: set[int] = set()
    for conversation, answer in corrections:
        if conversation not in grouped:
            grouped.add(conversation)
            groups[" ".join(_WORD.findall(answer.lower()))].append(conversation)
    shared = [sorted(m, key=lambda c: (_split_hash(c, policy), c))
              for m in groups.values() if len(m) >= 2]
    members = sum(len(m) for m in shared)
    want = max(1, round(members * policy.heldout_percent / 100)) if (
        members and policy.heldout_percent) else 0
    held = {id(m): sum(out.get(c) is True for c in m) for m in shared}
    total = sum(held.values())
    shared.sort(key=lambda m: (_split_hash(m[0], policy), m[0]))
    for rank in range(max((len(m) for m in shared), default=0)):
        for m in shared:  # round `rank`: each answer's (rank+1)-th held-out conversation
            if total >= want:
                break
            if held[id(m)] > rank or held[id(m)] >= len(m) - 1:
                continue
            free = [c for c in m if c not in out]
            if free:
                out[free[0]] = True
                held[id(m)] += 1
                total += 1
    for c in grouped:
        out.setdefault(c, False)
    for c in conversations:
        out.setdefault(c, _split_hash(c, policy) < policy.heldout_votes_percent)
    return out
