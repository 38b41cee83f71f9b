"""Votes alone teach: the real training worker on a votes-only dataset, judged by the gate on
held-out votes. Consistent votes (👍 the company's answer, 👎 a non-answer) pass; the same
votes with their labels shuffled do not."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import pytest

from feedback.evaluate import GatePolicy, gate
from feedback.examples import Example, write_jsonl
from feedback.job import TrainJob
from feedback.train import train

pytestmark = pytest.mark.slow
COMPANY = json.loads((Path(__file__).parents[2] / "feedback/data/company.json").read_text())
INTENTS = [COMPANY["intents"][i] for i in (4, 20, 33)]
SYSTEM = "Be brief."
NON_ANSWER = "I'm not sure about that. Please check our website or contact us for details."
TINY = dict(rank=8, alpha=16, epochs=4.0, batch_size=4, max_length=128, learning_rate=2e-3,
            kto_min_examples=10**6, anchors=0, augment=0, eval_max_tokens=16,
            parity_max_tokens=4)  # SFT on the liked answers only: the mechanism, quickly


def _votes(shuffle: bool) -> tuple[list[Example], list[Example]]:
    """(trained liked answers, held-out votes): per question a 👍 company answer and a 👎
    non-answer; the last two questions of each intent are held out."""
    votes = []
    n = 0
    for intent in INTENTS:
        for k, q in enumerate(intent["questions"]):
            for liked, answer in ((True, intent["answer"]), (False, NON_ANSWER)):
                n += 1
                votes.append((k >= 3, Example(n, n, [{"role": "system", "content": SYSTEM},
                                                     {"role": "user", "content": q}],
                                              answer, "vote", label=liked)))
    labels = [e.label for _, e in votes]
    if shuffle:
        random.Random(1).shuffle(labels)
    sft, held = [], []
    for (out, e), liked in zip(votes, labels, strict=True):
        e = Example(e.conversation_id, e.answer_id, e.prompt, e.completion, "vote", label=liked)
        if out:
            held.append(e)
        elif liked:
            sft.append(Example(e.conversation_id, e.answer_id, e.prompt, e.completion, "liked"))
    return sft, held


@pytest.mark.parametrize("shuffle", [False, True], ids=["consistent", "shuffled"])
def test_a_votes_only_candidate_passes_on_consistent_votes_and_fails_on_shuffled(
        shuffle: bool, tmp_path: Path, model_dir: Path) -> None:
    sft, held = _votes(shuffle)
    work = tmp_path / "run"
    for name, rows in (("sft", sft), ("heldout_votes", held)):
        write_jsonl([asdict(e) for e in rows], work / f"{name}.jsonl")
    job = TrainJob(model_dir=str(model_dir), out_dir=str(tmp_path / "adapter"),
                   work_dir=str(work), system_prompt=SYSTEM, **TINY)  # type: ignore[arg-type]
    report = train(job)
    assert report["heldout_examples"] == 0 and report["heldout_votes"] == len(held) == 12
    reasons = gate(report, GatePolicy())
    if shuffle:
        assert any("vote margin" in r for r in reasons), reasons
    else:
        assert reasons == []
        assert report["candidate"]["vote_margin"] > report["parent"]["vote_margin"]
