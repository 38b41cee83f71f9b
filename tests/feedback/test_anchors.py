"""Self-distillation anchors: general prompts apart from the golden set, KL on the answer tokens."""

from __future__ import annotations

import re

from feedback.dataset import Example
from feedback.evaluate import golden_set
from feedback.train import _anchor_batches, general_prompts


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def test_the_anchor_prompts_are_not_the_golden_set() -> None:
    prompts = general_prompts()
    assert len(prompts) >= 32 and len(set(prompts)) == len(prompts)
    for g in golden_set():
        q = _words(g["question"])
        for p in prompts:
            w = _words(p)
            assert len(q & w) / len(q | w) < 0.6, (p, g["question"])


def test_anchor_batches_mark_the_positions_that_predict_the_answer_and_its_end(
        tokenizer) -> None:  # type: ignore[no-untyped-def]
    system = [{"role": "system", "content": "Answer briefly."}]
    anchors = [Example(0, 0, [*system, {"role": "user", "content": q}], a, "anchor")
               for q, a in [("What is 2 plus 2?", "2 plus 2 is 4."),
                            ("Name a colour.", "Blue is a colour, and so is green.")]]
    (batch,) = _anchor_batches(tokenizer, anchors, size=8)
    assert batch["input_ids"].shape[0] == 2
    for row, example in enumerate(anchors):
        ids = batch["input_ids"][row]
        positions = batch["mask"][row].nonzero()[:, 0]
        targets = ids[positions + 1]  # the token each marked position predicts
        # as in TRL's completion mask: the answer, the end of turn and the template's newline
        assert tokenizer.decode(targets) == example.completion + "<|im_end|>\n"
        assert batch["attention_mask"][row].sum() == positions[-1] + 2
