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
