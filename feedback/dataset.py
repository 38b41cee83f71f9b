"""Feedback -> training data: thumbs are candidates, reviewed corrections are the labels.

`build_dataset` reads the feedback that arrived after a watermark and returns
SFT examples (trusted corrections, optionally liked answers), binary-labelled
KTO examples (answers whose weighted vote counts), a held-out split chosen by
conversation (recorded the first time, so stable across runs), and a replay
sample of earlier training data. Every text is
redacted first; the dataset hash is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import aliased
from sqlmodel.ext.asyncio.session import AsyncSession

from feedback.redaction import Redactor
from storage.models import AnswerStatus, Conversation, Feedback, Message, ReviewStatus, Role

TokenCounter = Callable[[str], int]


def approx_tokens(text: str) -> int:
    return len(text) // 4 + 4


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
class Example:
    """One training or evaluation example; `prompt` is a chat (context + question)."""

    conversation_id: int
    answer_id: int
    prompt: list[dict[str, str]]
    completion: str
    source: str  # correction | liked | vote | replay
    label: bool | None = None  # KTO examples only
    rejected: str | None = None  # the answer a correction replaced (preference pairs)


@dataclass
class Dataset:
    sft: list[Example] = field(default_factory=list)
    kto: list[Example] = field(default_factory=list)
    heldout: list[Example] = field(default_factory=list)  # corrections in held-out conversations
    watermark: int = 0  # the highest feedback id this dataset has seen
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        parts = (self.sft, self.kto, self.heldout)
        blob = json.dumps([[asdict(e) for e in part] for part in parts],
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for split, kind, part in (("train", "sft", self.sft), ("train", "kto", self.kto),
                                  ("heldout", "sft", self.heldout)):
            out += [{"split": split, "kind": kind, **asdict(e)} for e in part]
        return out


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


async def _recorded_splits(session: AsyncSession, conversations: set[int],
                           policy: DatasetPolicy, corrections: list[tuple[int, str]]
                           ) -> dict[int, bool]:
    """The conversations' splits: recorded ones kept, new ones decided and recorded (a
    concurrent builder's decision wins), so a conversation never moves between splits."""
    ids = sorted(conversations)

    async def recorded() -> dict[int, bool]:
        out: dict[int, bool] = {}
        for i in range(0, len(ids), 1000):  # bounded IN lists
            stmt = select(Conversation.id, Conversation.heldout).where(
                Conversation.id.in_(ids[i:i + 1000]), Conversation.heldout.is_not(None))
            out.update({c: bool(h) for c, h in (await session.execute(stmt)).all()})
        return out

    decided = await recorded()
    split = split_conversations(corrections, ids, decided, policy)
    new = [{"cid": c, "held": h} for c, h in split.items() if c not in decided]
    if not new:
        return split
    table = Conversation.__table__
    stmt = (update(table).where(table.c.id == bindparam("cid"), table.c.heldout.is_(None))
            .values(heldout=bindparam("held")))
    await (await session.connection()).execute(stmt, new)
    await session.commit()
    return await recorded()


@dataclass
class _Row:
    fb: Feedback
    answer: Message
    question: Message


async def build_dataset(
    session: AsyncSession, *, policy: DatasetPolicy, redactor: Redactor, since: int = 0,
    replay_pool: Sequence[Example] = (), count_tokens: TokenCounter = approx_tokens,
) -> Dataset:
    """Build the dataset from feedback with id > `since` plus a replay sample of `replay_pool`;
    records the split of each conversation it uses for the first time (and commits)."""
    rows = await _feedback_rows(session, since)
    report: dict[str, Any] = {"feedback_rows": len(rows)}
    first_seen = await _first_seen(session, {r.fb.voter_id for r in rows})
    quarantined = _brigading(rows, first_seen, policy)
    report["quarantined_votes"] = len(quarantined)
    rows, report["capped_rows"] = _cap_per_user(rows, policy.per_user_cap)
    contexts = await _contexts(session, rows, redactor, policy, count_tokens)
    approved = [r for r in rows
                if r.fb.correction and r.fb.review_status == ReviewStatus.APPROVED]
    heldout = await _recorded_splits(session, {r.answer.conversation_id for r in rows}, policy,
                                     [(r.answer.conversation_id, r.fb.correction or "")
                                      for r in approved])
    ds = Dataset(watermark=max((r.fb.id or 0 for r in rows), default=since), report=report)

    corrected: set[int] = set()
    for r in approved:
        ex = Example(r.answer.conversation_id, r.answer.id or 0, contexts[r.answer.id or 0],
                     redactor(r.fb.correction or ""), "correction",
                     rejected=redactor(r.answer.text))
        corrected.add(ex.answer_id)
        if heldout[ex.conversation_id]:
            ds.heldout.append(ex)
        else:
            ds.sft.append(ex)
            ds.kto.append(Example(ex.conversation_id, ex.answer_id, ex.prompt, ex.completion,
                                  "correction", label=True))
            ds.kto.append(Example(ex.conversation_id, ex.answer_id, ex.prompt,
                                  ex.rejected or "", "correction", label=False))
    labels = _vote_labels(rows, first_seen, quarantined, policy)
    report["labelled_answers"] = len(labels)
    answers = {r.answer.id: r.answer for r in rows}
    for answer_id, label in sorted(labels.items()):
        answer = answers[answer_id]
        if answer_id in corrected or heldout[answer.conversation_id]:
            continue
        ex = Example(answer.conversation_id, answer_id, contexts[answer_id],
                     redactor(answer.text), "vote", label=label)
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


async def _feedback_rows(session: AsyncSession, since: int) -> list[_Row]:
    answer, question = aliased(Message), aliased(Message)
    stmt = (select(Feedback, answer, question)
            .join(answer, answer.id == Feedback.answer_id)
            .join(question, question.id == answer.reply_to_id)
            .where(Feedback.id > since, answer.status == AnswerStatus.OK)
            .order_by(Feedback.id))
    return [_Row(*row) for row in (await session.execute(stmt)).all()]


async def _first_seen(session: AsyncSession, voters: set[str]) -> dict[str, datetime]:
    """When each voter was first active (any vote or message): new accounts weigh less."""
    seen: dict[str, datetime] = {}
    if not voters:
        return seen
    queries = [
        select(Feedback.voter_id, func.min(Feedback.created_at))
        .where(Feedback.voter_id.in_(voters)).group_by(Feedback.voter_id),
        select(Message.author_id, func.min(Message.created_at))
        .where(Message.author_id.in_(voters)).group_by(Message.author_id),
    ]
    for stmt in queries:
        for voter, when in (await session.execute(stmt)).all():
            when = _aware(when)
            seen[voter] = min(seen.get(voter, when), when)
    return seen


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _is_new(fb: Feedback, first_seen: dict[str, datetime], policy: DatasetPolicy) -> bool:
    if fb.trusted:
        return False
    seen = first_seen.get(fb.voter_id, _aware(fb.created_at))
    return _aware(fb.created_at) - seen < policy.new_voter_age


def _brigading(rows: list[_Row], first_seen: dict[str, datetime],
               policy: DatasetPolicy) -> set[int]:
    """Feedback ids of new-voter votes, if some window holds a burst of them (else empty)."""
    votes = sorted((r for r in rows if r.fb.rating is not None),
                   key=lambda r: _aware(r.fb.created_at))
    new = [r for r in votes if _is_new(r.fb, first_seen, policy)]
    for i, start in enumerate(new):
        end = _aware(start.fb.created_at) + policy.burst_window
        burst = [r for r in new[i:] if _aware(r.fb.created_at) <= end]
        total = sum(1 for r in votes if _aware(start.fb.created_at) <= _aware(r.fb.created_at)
                    <= end)
        if len(burst) >= policy.burst_min_votes and len(burst) / total >= policy.burst_new_share:
            return {r.fb.id or 0 for r in new}
    return set()


def _cap_per_user(rows: list[_Row], cap: int) -> tuple[list[_Row], int]:
    used: dict[str, int] = defaultdict(int)
    kept = []
    for r in rows:
        if r.fb.trusted or used[r.fb.voter_id] < cap:
            used[r.fb.voter_id] += 1
            kept.append(r)
    return kept, len(rows) - len(kept)


def _vote_labels(rows: list[_Row], first_seen: dict[str, datetime], quarantined: set[int],
                 policy: DatasetPolicy) -> dict[int, bool]:
    """answer id -> liked?, for answers whose weighted vote has enough distinct voters."""
    score: dict[int, float] = defaultdict(float)
    voters: dict[int, set[str]] = defaultdict(set)
    trusted: set[int] = set()
    for r in rows:
        if r.fb.rating is None or (r.fb.id or 0) in quarantined:
            continue
        weight = (policy.trusted_weight if r.fb.trusted else
                  policy.new_voter_weight if _is_new(r.fb, first_seen, policy) else 1.0)
        score[r.fb.answer_id] += weight * r.fb.rating
        voters[r.fb.answer_id].add(r.fb.voter_id)
        if r.fb.trusted:
            trusted.add(r.fb.answer_id)
    return {a: s > 0 for a, s in score.items()
            if s != 0 and (a in trusted or len(voters[a]) >= policy.min_voters)}


async def _contexts(session: AsyncSession, rows: list[_Row], redactor: Redactor,
                    policy: DatasetPolicy, count: TokenCounter) -> dict[int, list[dict[str, str]]]:
    """answer id -> redacted chat prompt: earlier turns (newest first, within budget) + question."""
    conv_ids = {r.answer.conversation_id for r in rows}
    stmt = (select(Message).where(Message.conversation_id.in_(conv_ids))
            .order_by(Message.conversation_id, Message.id))
    by_conv: dict[int, list[Message]] = defaultdict(list)
    for m in (await session.execute(stmt)).scalars():
        by_conv[m.conversation_id].append(m)
    out: dict[int, list[dict[str, str]]] = {}
    for r in rows:
        question = {"role": "user", "content": redactor(r.question.text)}
        budget = policy.context_tokens - count(question["content"])
        earlier: list[dict[str, str]] = []
        failed = {m.reply_to_id for m in by_conv[r.answer.conversation_id]
                  if m.status == AnswerStatus.FAILED}
        for m in reversed(by_conv[r.answer.conversation_id]):
            if (m.id or 0) >= (r.question.id or 0):
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
        out[r.answer.id or 0] = (system if policy.system_prompt else []) + earlier + [question]
    return out


_WORD = re.compile(r"\w+")


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def dedupe(examples: Sequence[Example], threshold: float) -> list[Example]:
    """Drop near-duplicates: same label, near-identical question and near-identical answer."""
    kept: list[tuple[Example, frozenset[str], frozenset[str]]] = []
    for ex in examples:
        q, a = _words(ex.prompt[-1]["content"]), _words(ex.completion)
        if any(k.label == ex.label and _jaccard(q, kq) >= threshold and _jaccard(a, ka) >= threshold
               for k, kq, ka in kept):
            continue
        kept.append((ex, q, a))
    return [k for k, _, _ in kept]


def replay_sample(pool: Sequence[Example], new: Sequence[Example], fraction: float, *,
                  seed: int) -> list[Example]:
    """A deterministic sample of earlier training examples (not already in `new`)."""
    present = {(json.dumps(e.prompt), e.completion) for e in new}
    candidates = [e for e in pool if (json.dumps(e.prompt), e.completion) not in present]
    k = min(len(candidates), math.ceil(len(new) * fraction))
    chosen = random.Random(seed).sample(candidates, k) if k else []
    return [Example(e.conversation_id, e.answer_id, e.prompt, e.completion, "replay")
            for e in chosen]


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    return path


def read_examples(path: Path) -> list[Example]:
    """Examples from a dataset JSONL file (the `kind`/`split` columns are dropped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        row.pop("split", None)
        row.pop("kind", None)
        out.append(Example(**row))
    return out
