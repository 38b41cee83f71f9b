"""Self-distillation anchors: general prompts apart from the golden set, KL on the answer tokens."""

from __future__ import annotations

import re

import pytest

from feedback.anchors import general_prompts
from feedback.dataset import Example
from feedback.evaluate import completion_batches, golden_set


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
    (batch,) = completion_batches(tokenizer, [(e.prompt, e.completion) for e in anchors], 8)
    assert batch["input_ids"].shape[0] == 2
    predicted = []
    for row in range(2):
        ids = batch["input_ids"][row]
        positions = batch["mask"][row].nonzero()[:, 0]
        targets = ids[positions + 1]  # the token each marked position predicts
        predicted.append(tokenizer.decode(targets))
        assert batch["attention_mask"][row].sum() == positions[-1] + 2
    # as in TRL's completion mask: the answer, the end of turn and the template's newline
    assert sorted(predicted) == sorted(e.completion + "<|im_end|>\n" for e in anchors)


def test_anchor_batches_are_even_and_group_rows_of_similar_length(
        tokenizer) -> None:  # type: ignore[no-untyped-def]
    anchors = [Example(0, 0, [{"role": "user", "content": f"Question {i}?"}],
                       " ".join(["word"] * (1 + (i * 7) % 17)), "anchor") for i in range(17)]
    batches = completion_batches(tokenizer, [(e.prompt, e.completion) for e in anchors], 5)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 4, 5]  # not 5, 5, 5, 2
    answers = sorted(tokenizer.decode(b["input_ids"][row][b["mask"][row].roll(1)])
                     for b in batches for row in range(len(b["input_ids"])))
    assert answers == sorted(e.completion + "<|im_end|>\n" for e in anchors)  # each once
    widths = [b["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths)  # short rows are padded to short widths
    assert sum(int(b["attention_mask"].sum()) for b in batches) / sum(
        b["attention_mask"].numel() for b in batches) > 0.9


def test_batched_completion_logps_match_one_full_forward_each(
        model_dir, tokenizer) -> None:  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM

    from feedback.evaluate import completion_logps, pref_wins, share

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    items = [([{"role": "user", "content": q}], a) for q, a in [
        ("What is 2 plus 2?", "4."), ("Name a colour.", "Blue is a colour, and so is green."),
        ("Where is Paris?", "Paris is in France, on the Seine."), ("Hi!", "Hello! How can I help?"),
        ("Say nothing.", "")]]
    expected = []
    for prompt, completion in items:  # the plain way: full logits of one unpadded sequence
        start = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])
        ids = torch.tensor([tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": completion}], tokenize=True,
            return_dict=True)["input_ids"]])
        with torch.inference_mode():
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        token_logps = logps.gather(1, ids[0, 1:, None])[start - 1:, 0]
        expected.append((float(token_logps.sum()), int(token_logps.numel())))
    for size in (1, 2, 8):
        got = completion_logps(model, tokenizer, items, batch_size=size)
        assert [n for _, n in got] == [n for _, n in expected]
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-3)
    # the right answer beats a wrong one for a question, and pairs stay paired in the batch
    pairs = [(p, a, items[(i + 1) % 4][1]) for i, (p, a) in enumerate(items[:4])]
    assert share(pref_wins(model, tokenizer, pairs)) >= 0.75
