"""Question augmentation for SFT (feedback.train.augment_questions): noisy copies of each
question with the answer and the conversation context unchanged, the same on every run."""

from __future__ import annotations

from feedback.dataset import Example
from feedback.train import augment_questions

CONTEXT = [{"role": "system", "content": "Be brief."},
           {"role": "user", "content": "Hi there"},
           {"role": "assistant", "content": "Hello! How can I help?"}]


def _example(i: int, question: str) -> Example:
    return Example(i, 100 + i, [*CONTEXT, {"role": "user", "content": question}],
                   f"answer {i}", "correction")


EXAMPLES = [_example(1, "How long do I have to return something?"),
            _example(2, "Do you ship internationally to Germany?"),
            _example(3, "Hours?")]


def test_each_question_gets_noisy_copies_with_its_own_answer_and_context() -> None:
    noisy = augment_questions(EXAMPLES, 3, 0.2, seed=0)
    # a one-word question has nothing to drop or swap: it is not copied
    assert [(e.conversation_id, e.answer_id) for e in noisy] == [(1, 101)] * 3 + [(2, 102)] * 3
    for e in noisy:
        original = EXAMPLES[e.conversation_id - 1]
        assert e.source == "augment"
        assert e.completion == original.completion
        assert e.prompt[:-1] == CONTEXT and e.prompt[-1]["role"] == "user"
        words = e.prompt[-1]["content"].split()
        source = original.prompt[-1]["content"].split()
        assert words and set(words) <= set(source)  # only dropped or reordered words
    assert any(e.prompt[-1]["content"] != EXAMPLES[e.conversation_id - 1].prompt[-1]["content"]
               for e in noisy)


def test_augmentation_is_deterministic_and_off_by_default() -> None:
    assert augment_questions(EXAMPLES, 2, 0.2, seed=7) == augment_questions(EXAMPLES, 2, 0.2,
                                                                            seed=7)
    assert augment_questions(EXAMPLES, 2, 0.2, seed=7) != augment_questions(EXAMPLES, 2, 0.2,
                                                                            seed=8)
    assert augment_questions(EXAMPLES, 0, 0.2, seed=0) == []
    assert EXAMPLES[0].prompt[-1]["content"] == "How long do I have to return something?"
