"""The gate's report scores held-out corrections with the answer memory too (real model)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from feedback import candidate
from feedback.examples import Example
from feedback.job import TrainJob

COMPANY = json.loads((Path(__file__).parents[2] / "feedback/data/company.json").read_text())
SYSTEM = {"role": "system", "content": "Be brief."}


def example(i: int, question: str, answer: str) -> Example:
    return Example(i, i, [SYSTEM, {"role": "user", "content": question}], answer, "correction")


@pytest.mark.slow
def test_heldout_answers_are_scored_with_and_without_the_memory(model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    intents = COMPANY["intents"][:4]
    trained = [example(i, it["questions"][0], it["answer"]) for i, it in enumerate(intents)]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(asdict(e)) for e in trained))
    heldout = [example(10 + i, it["questions"][0] + " Please tell me.", it["answer"])
               for i, it in enumerate(intents)]
    heldout.append(example(99, intents[0]["questions"][0], intents[0]["answer"]))
    job = TrainJob(model_dir=str(model_dir), out_dir="", work_dir=str(tmp_path),
                   memory_embedder=os.environ["CHATLOOP_MEMORY_EMBEDDER"])
    memory = candidate._memory(job, heldout)  # the index's recall, at the calibrated thresholds
    assert memory is not None and len(memory.func.__self__) == 3  # the held-out one's is out
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    known = [e.completion for e in trained]
    m = candidate._memory_metrics(model, tok, heldout, known, 24, memory)
    assert set(m) == {"heldout_f1_memory", "heldout_accuracy_memory", "heldout_memory_verbatim"}
    assert m["heldout_memory_verbatim"] >= 3 and m["heldout_f1_memory"] > 0.6
    assert candidate._memory_metrics(model, tok, heldout, known, 24, None) == {}


def test_training_copies_quote_the_memory_as_the_turn_path_would(tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    from feedback.candidate import run_memory
    from feedback.train import _referenced

    intents = COMPANY["intents"][:6]
    memory = [{"question": q, "answer": it["answer"]}
              for it in intents for q in it["questions"][:2]]
    (tmp_path / "memory.jsonl").write_text("\n".join(json.dumps(r) for r in memory))
    heldout = example(50, intents[1]["questions"][1], intents[1]["answer"])
    (tmp_path / "heldout.jsonl").write_text(json.dumps(asdict(heldout)))
    sft = [example(i, it["questions"][0], it["answer"]) for i, it in enumerate(intents)]
    sft.append(Example(90, 90, sft[0].prompt, "a liked answer", "liked"))
    job = TrainJob(model_dir="", out_dir="", work_dir=str(tmp_path),
                   memory_embedder=os.environ["CHATLOOP_MEMORY_EMBEDDER"])

    def copies_of(job: TrainJob) -> list[Example]:
        return _referenced(job, sft, tokenizer, run_memory(job, copies=True))

    copies = {e.conversation_id: e for e in copies_of(job)}
    assert 90 not in copies  # corrections only
    # a question nothing in the memory is near enough to quote gets no copy
    assert {0, 2, 4} <= set(copies) <= set(range(len(intents)))
    for i, e in copies.items():
        own = sft[i]
        assert e.source == "referenced" and e.completion == own.completion
        assert e.prompt[-1] == own.prompt[-1]  # the question itself, last
        quoted = e.prompt[1:-1]  # earlier exchanges between the system prompt and it
        asked = [m["content"] for m in quoted if m["role"] == "user"]
        assert e.prompt[0]["content"].startswith(SYSTEM["content"] + "\n\nApproved answers")
        assert 1 <= len(asked) <= 3 and own.prompt[-1]["content"] not in asked
        assert heldout.prompt[-1]["content"] not in asked  # the gate's questions stay unseen
        assert [m["role"] for m in quoted] == ["user", "assistant"] * len(asked)
    # an intent's other phrasing is quoted with its answer (the one to follow)
    for i in (0, 2, 4):
        quoted = [m["content"] for m in copies[i].prompt[1:-1]]
        at = quoted.index(intents[i]["questions"][1])
        assert quoted[at + 1] == intents[i]["answer"]
    # intent 1's other phrasing is held out: what is quoted is another intent's
    assert intents[1]["answer"] not in [m["content"] for m in copies[1].prompt[1:-1]] \
        if 1 in copies else True

    # a copy longer than training's max_length quotes fewer entries, or none is made
    def length(e: Example) -> int:
        return len(tokenizer(tokenizer.apply_chat_template(
            [*e.prompt, {"role": "assistant", "content": e.completion}], tokenize=False),
            add_special_tokens=False)["input_ids"])

    longest = max(copies.values(), key=length)
    job.max_length = length(longest) - 1
    shorter = {e.conversation_id: e for e in copies_of(job)}
    assert all(length(e) <= job.max_length for e in shorter.values())
    cut = shorter.get(longest.conversation_id)
    assert cut is None or len(cut.prompt) < len(longest.prompt)
    job.max_length = 16
    assert copies_of(job) == []

    job.max_length, job.reference_copies = 384, False
    assert copies_of(job) == []
    # nothing held out and no copies wanted: the memory is not even indexed
    (tmp_path / "heldout.jsonl").unlink()
    assert run_memory(job, copies=False) is None and run_memory(job, copies=True) is not None
    job.reference_copies, job.memory_embedder = True, ""
    assert copies_of(job) == []


def test_settlings_copies_quote_the_held_out_questions_entries_too(tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    from feedback.candidate import run_memory, whole_memory
    from feedback.train import _referenced

    intents = COMPANY["intents"][:6]
    memory = [{"question": q, "answer": it["answer"]}
              for it in intents for q in it["questions"][:2]]
    (tmp_path / "memory.jsonl").write_text("\n".join(json.dumps(r) for r in memory))
    held = intents[1]["questions"][1]
    heldout = example(50, held, intents[1]["answer"])
    (tmp_path / "heldout.jsonl").write_text(json.dumps(asdict(heldout)))
    # settling trains on the held-out correction beside the others
    sft = [example(i, it["questions"][0], it["answer"]) for i, it in enumerate(intents)]
    job = TrainJob(model_dir="", out_dir="", work_dir=str(tmp_path),
                   memory_embedder=os.environ["CHATLOOP_MEMORY_EMBEDDER"])
    gates = run_memory(job, copies=True)
    assert gates is not None and len(gates[0]) == len(memory) - 1
    asked = {e.conversation_id: [m["content"] for m in e.prompt[1:-1]]
             for e in _referenced(job, sft, tokenizer, gates)}
    assert all(held not in quoted for quoted in asked.values())

    index = gates[0]
    embedded = []
    embed = index.vectors
    index.vectors = lambda docs: embedded.extend(docs) or embed(docs)  # type: ignore[method-assign]
    whole = whole_memory(job, gates)
    assert whole is not None and len(whole[0]) == len(memory)
    assert [d.question for d in embedded] == [held]  # only the left-out entry is embedded
    quoted = {e.conversation_id: [m["content"] for m in e.prompt[1:-1]]
              for e in _referenced(job, sft, tokenizer, whole)}
    assert held in quoted[1]  # intent 1's other phrasing, with its answer
    assert quoted[1][quoted[1].index(held) + 1] == intents[1]["answer"]
    # no gate memory (nothing embedded yet, or no embedder): built whole, or none
    assert len(whole_memory(job, None)[0]) == len(memory)  # type: ignore[index]
    job.memory_embedder = ""
    assert whole_memory(job, None) is None
