"""Training examples: the dataset the loop builds and the training process reads.

`Example` and `Dataset` are the contract between the two (JSONL files in the run's
directory); `dedupe`, `replay_sample`, `augment_questions` and `rephrasings` are pure
operations over examples.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Example:
    """One training or evaluation example; `prompt` is a chat (context + question)."""

    conversation_id: int
    answer_id: int
    prompt: list[dict[str, str]]
    completion: str
    source: str  # correction | liked | vote | replay | augment | rephrasing
    label: bool | None = None  # KTO examples only
    rejected: str | None = None  # the answer a correction replaced (preference pairs)


@dataclass
class Dataset:
    sft: list[Example] = field(default_factory=list)
    kto: list[Example] = field(default_factory=list)
    # the gate's data: corrections in held-out conversations (or `rephrasings`)
    heldout: list[Example] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    # feedback id -> (revision, role): what the run building it consumes (storage.runs)
    consumed: dict[int, tuple[int, str]] = field(default_factory=dict)
    # preference pairs from hand-offs (chosen: `completion`, the agent's reply; `rejected`:
    # the bot's answer), the trained ones; also SFT corrections above
    dpo: list[Example] = field(default_factory=list)
    # the gate's data from votes: labelled answers (`label`) in held-out conversations, judged
    # by the log-probability margin of liked over disliked answers (votes-only runs)
    heldout_votes: list[Example] = field(default_factory=list)
    # answer id -> the feedback ids of its held-out corrections (what a run that trains on
    # them after its gate passed marks as trained: storage.runs.settle_heldout)
    heldout_feedback: dict[int, list[int]] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        parts = (self.sft, self.kto, self.heldout) + (
            (self.heldout_votes,) if self.heldout_votes else ())
        blob = json.dumps([[asdict(e) for e in part] for part in parts],
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for split, kind, part in (("train", "sft", self.sft), ("train", "kto", self.kto),
                                  ("heldout", "sft", self.heldout)):
            out += [{"split": split, "kind": kind, **asdict(e)} for e in part]
        # DPO pairs in TRL's format (prompt, chosen, rejected), beside the example's fields
        out += [{"split": "train", "kind": "dpo", **asdict(e), "chosen": e.completion}
                for e in self.dpo]
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


def augment_questions(examples: Sequence[Example], copies: int, drop: float, *,
                      seed: int, source: str = "augment") -> list[Example]:
    """`copies` noisy variants of each example's question (the last message), the answer
    unchanged: each word dropped with probability `drop`, or two words swapped (EDA, Wei and
    Zou 2019), so the adapter keys on a question's content words rather than its wording."""
    rng = random.Random(seed)
    out = []
    for e in examples:
        words = e.prompt[-1]["content"].split()
        if len(words) < 3:
            continue
        for _ in range(copies):
            if rng.random() < 0.5:
                noisy = [w for w in words if rng.random() >= drop] or [rng.choice(words)]
            else:
                noisy = list(words)
                i, j = rng.sample(range(len(noisy)), 2)
                noisy[i], noisy[j] = noisy[j], noisy[i]
            question = {**e.prompt[-1], "content": " ".join(noisy)}
            out.append(Example(e.conversation_id, e.answer_id, [*e.prompt[:-1], question],
                               e.completion, source))
    return out


def referenced(prompt: list[dict[str, str]],
               refs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """The prompt as the turn path builds it when the answer memory quotes entries `refs`
    ((question, answer), best first): quoted in the system prompt and shown as earlier
    exchanges, best last (inference.prompt), before the conversation."""
    from inference.base import chat_dicts
    from inference.prompt import reference_exchanges, with_references

    system = prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else ""
    rest = prompt[1:] if system else prompt
    head = [{"role": "system", "content": with_references(system, refs)}] \
        if system or refs else []
    return [*head, *chat_dicts(reference_exchanges(refs)), *rest]


def reference_copies(examples: Sequence[Example],
                     refs_for: Callable[[str], Sequence[tuple[str, str]]],
                     fits: Callable[[Example], bool] = lambda e: True, *,
                     source: str = "referenced") -> list[Example]:
    """Each correction once more, with the entries the answer memory quotes for its question
    in the prompt (`refs_for`: (question, answer) pairs, best first, its own entry left
    out), the answer unchanged: retrieval-augmented fine-tuning (RAFT, Zhang et al. 2024).
    The adapter then follows an approved answer the turn path quotes when it is the right
    one, and still answers from what it learned when the quoted ones are another question's.
    A copy that does not `fits` (the training length) quotes fewer entries, or is left out."""
    out = []
    for e in examples:
        refs = list(refs_for(e.prompt[-1]["content"])) if e.source == "correction" else []
        while refs:
            copy = Example(e.conversation_id, e.answer_id, referenced(e.prompt, refs),
                           e.completion, source)
            if fits(copy):
                out.append(copy)
                break
            refs.pop()
    return out


REPHRASING_SEED = 7919  # never the training seed: the gate's rephrasings are not its copies


def rephrasings(corrections: Sequence[Example], *, trained: Sequence[Example], copies: int = 2,
                drop: float = 0.3) -> list[Example]:
    """The gate's data when no correction can be held out (every answer corrected once, as
    in a first demo): noisy rephrasings of the trained corrections' questions that are in no
    training example (`trained`: the SFT set and its augmented copies), one per question at
    most `copies` tries. Weaker evidence than a real unseen phrasing; the run report says
    which the gate used."""
    seen = {" ".join(_WORD.findall(e.prompt[-1]["content"].lower())) for e in trained}
    out, used = [], set()
    for e in augment_questions(corrections, copies, drop, seed=REPHRASING_SEED,
                               source="rephrasing"):
        key = " ".join(_WORD.findall(e.prompt[-1]["content"].lower()))
        if key not in seen and e.answer_id not in used:
            used.add(e.answer_id)
            out.append(e)
    return out


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
