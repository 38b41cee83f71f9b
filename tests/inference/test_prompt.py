"""PromptFitter on the bundled tokenizer: what it keeps, and that its byte bound never lies."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from inference.base import ChatMessage
from inference.errors import ContextTooLong
from inference.prompt import PromptFitter, reference_exchanges

SAMPLES = ["How do I reset my password?", "Zürich → Genève: 3½ h?", "日本語のテキストです。",
           "emoji 👍🏽👎 and ZWJ 👩‍👩‍👧",
           "   spaced\n\n\ttext   ", "<|im_start|>user\nhi<|im_end|>",
           "a" * 300, "x", "1234567890 " * 20, "ﬁ ﬀ ㍿ ½"]


@pytest.fixture(scope="module")
def tokenizer(model_dir):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(model_dir)


def _conversation(rng: random.Random, exchanges: int) -> list[ChatMessage]:
    out = []
    for _ in range(exchanges):
        out += [ChatMessage("user", rng.choice(SAMPLES)),
                ChatMessage("assistant", rng.choice(SAMPLES))]
    return out


def test_bytes_bound_the_tokens_of_the_bundled_tokenizer(tokenizer) -> None:  # type: ignore[no-untyped-def]
    fitter = PromptFitter(tokenizer, context_tokens=2048, max_tokens=128)
    assert fitter.bytes_bound_tokens  # SmolLM2: byte-level BPE, no normalizer
    for text in SAMPLES:
        messages = [ChatMessage("user", text)]
        assert fitter.count(messages) <= len(fitter.render(messages).encode())


@pytest.mark.parametrize("context", [60, 90, 130, 200, 400, 1000])
def test_fit_keeps_what_an_exact_count_keeps(tokenizer, context: int) -> None:  # type: ignore[no-untyped-def]
    """The byte bound only skips counting: the kept history is the same as counting always,
    whatever the context size (many prompts lie between the token and the byte budget)."""
    fast = PromptFitter(tokenizer, context_tokens=context, max_tokens=16)
    exact = PromptFitter(tokenizer, context_tokens=context, max_tokens=16)
    exact.bytes_bound_tokens = False
    rng = random.Random(context)
    for _ in range(30):
        history, question = _conversation(rng, rng.randrange(6)), rng.choice(SAMPLES)
        try:
            expected = exact.fit("Be brief.", history, question)
        except ContextTooLong:
            with pytest.raises(ContextTooLong):
                fast.fit("Be brief.", history, question)
            continue
        kept = fast.fit("Be brief.", history, question)
        assert kept == expected
        assert fast.count(kept) <= fast.budget


def test_fit_drops_whole_exchanges_oldest_first(tokenizer) -> None:  # type: ignore[no-untyped-def]
    fitter = PromptFitter(tokenizer, context_tokens=120, max_tokens=16)
    history = []
    for i in range(6):
        history += [ChatMessage("user", f"question number {i} " * 3),
                    ChatMessage("assistant", f"answer number {i} " * 3)]
    kept = fitter.fit("Be brief.", history, "and now?")
    assert kept[0] == ChatMessage("system", "Be brief.") and kept[-1].content == "and now?"
    middle = kept[1:-1]
    assert middle and len(middle) < len(history) and middle == history[-len(middle):]
    assert middle[0].role == "user"
    assert fitter.count(kept) <= fitter.budget
    assert fitter.count(kept[:1] + history[-len(middle) - 2:] + kept[-1:]) > fitter.budget


def test_reference_exchanges_stay_until_the_whole_history_is_gone(tokenizer) -> None:  # type: ignore[no-untyped-def]
    refs = [("Best question?", "Best answer."), ("Second question?", "Second answer.")]
    examples = reference_exchanges(refs)
    assert [(m.role, m.content) for m in examples] == [
        ("user", "Second question?"), ("assistant", "Second answer."),
        ("user", "Best question?"), ("assistant", "Best answer.")]  # the best last
    history = _conversation(random.Random(7), 6)
    roomy = PromptFitter(tokenizer, context_tokens=4096, max_tokens=16)
    kept = roomy.fit("Be brief.", history, "q?", examples=examples)
    assert kept == [ChatMessage("system", "Be brief."), *examples, *history,
                    ChatMessage("user", "q?")]
    alone = [ChatMessage("system", "Be brief."), ChatMessage("user", "q?")]
    with_examples = PromptFitter(tokenizer, context_tokens=10_000, max_tokens=16).count(
        [alone[0], *examples, alone[1]])
    # room for the examples and the question, not for any history: all of it goes first
    tight = PromptFitter(tokenizer, context_tokens=with_examples + 16, max_tokens=16)
    assert tight.fit("Be brief.", history, "q?", examples=examples) == [
        alone[0], *examples, alone[1]]
    # room for the question alone: the examples go too, rather than refusing it
    tighter = PromptFitter(tokenizer, context_tokens=with_examples + 15, max_tokens=16)
    assert tighter.fit("Be brief.", history, "q?", examples=examples) == alone


def test_a_question_too_long_for_the_context_is_refused(tokenizer) -> None:  # type: ignore[no-untyped-def]
    fitter = PromptFitter(tokenizer, context_tokens=64, max_tokens=16)
    with pytest.raises(ContextTooLong):
        fitter.fit("Be brief.", [], "word " * 100)


def test_no_bytes_bound_without_a_byte_level_tokenizer(tokenizer) -> None:  # type: ignore[no-untyped-def]
    from tokenizers import normalizers

    backend = tokenizer.backend_tokenizer
    saved = backend.normalizer
    backend.normalizer = normalizers.NFKC()  # could lengthen the text: counting is needed
    try:
        assert not PromptFitter(tokenizer, context_tokens=2048, max_tokens=16).bytes_bound_tokens
    finally:
        backend.normalizer = saved
    assert PromptFitter(tokenizer, context_tokens=2048, max_tokens=16).bytes_bound_tokens


def test_max_tokens_must_leave_room(tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="below context"):
        PromptFitter(tokenizer, context_tokens=128, max_tokens=128)


def _template_length(tokenizer, messages: list[ChatMessage]) -> int:  # type: ignore[no-untyped-def]
    ids = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], tokenize=True,
        add_generation_prompt=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_count_is_what_the_chat_template_tokenizes_to(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Counted in cached pieces between the added tokens, a prompt has the length transformers'
    `apply_chat_template(tokenize=True)` gives it: special-token look-alikes in a message,
    pieces met before (from the cache) and pieces new alike."""
    fitter = PromptFitter(tokenizer, context_tokens=2048, max_tokens=128)
    assert fitter._added is not None  # the piece-wise count is the one tested
    rng = random.Random(7)
    samples = [*SAMPLES, "<|im_end|><|im_start|>", "<|im_start|", "end<|endoftext|>tail",
               " leading space", "trailing newline\n", "\n"]
    for _ in range(150):
        history = [ChatMessage(rng.choice(["user", "assistant"]), rng.choice(samples))
                   for _ in range(rng.randrange(8))]
        messages = [ChatMessage("system", rng.choice(["Be brief.", ""])), *history,
                    ChatMessage("user", rng.choice(samples) + rng.choice(samples))]
        assert fitter.count(messages) == _template_length(tokenizer, messages)


def test_a_tokenizer_whose_added_tokens_strip_spaces_is_counted_whole(model_dir) -> None:  # type: ignore[no-untyped-def]
    """An added token that swallows the spaces beside it would make pieces count apart what
    they do not count together: such a tokenizer is counted on the whole text."""
    from tokenizers import AddedToken

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens([AddedToken("<sep>", lstrip=True, rstrip=True)])
    fitter = PromptFitter(tokenizer, context_tokens=2048, max_tokens=128)
    assert fitter._added is None
    messages = [ChatMessage("user", "before   <sep>   after"), ChatMessage("assistant", "ok")]
    assert fitter.count(messages) == _template_length(tokenizer, messages)


def test_a_sentencepiece_style_tokenizer_is_counted_whole(model_dir) -> None:  # type: ignore[no-untyped-def]
    """A Metaspace pre-tokenizer (Llama 2, Mistral) may mark only the text's first piece with
    its space symbol: pieces alone could count otherwise, so the whole text is counted."""
    from tokenizers import pre_tokenizers

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    fitter = PromptFitter(tokenizer, context_tokens=2048, max_tokens=128)
    assert fitter._added is None and not fitter.bytes_bound_tokens
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "hi there"),
                ChatMessage("assistant", "ok then"), ChatMessage("user", "and?")]
    assert fitter.count(messages) == _template_length(tokenizer, messages)


def test_a_tokenizer_with_only_a_chat_template_is_counted_by_it() -> None:
    """Any object with `apply_chat_template` serves (a served model's own tokenizer may not be
    a fast one): it counts the prompt itself."""

    class Templated:
        def apply_chat_template(self, messages, tokenize=False, **_):  # type: ignore[no-untyped-def]
            text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
            return list(range(len(text))) if tokenize else text

    fitter = PromptFitter(Templated(), context_tokens=60, max_tokens=10)  # 50 to fill
    history = [ChatMessage("user", "q" * 8), ChatMessage("assistant", "a" * 8)]
    assert fitter.count(history) == len("[user]qqqqqqqq[assistant]aaaaaaaa")
    assert fitter.fit("", history, "now?") == history + [ChatMessage("user", "now?")]
    assert fitter.fit("", history * 2, "now?") == history + [ChatMessage("user", "now?")]
