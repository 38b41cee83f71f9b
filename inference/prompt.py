"""Fit a conversation into the model's context window with the tokenizer's chat template."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

from inference.base import ChatMessage, chat_dicts
from inference.errors import ContextTooLong

PIECES_CACHED = 8192  # pieces of rendered prompts whose token counts are kept (LRU)


class PromptFitter:
    """Keeps the system prompt and the question, and as much recent history as fits.

    With a byte-level BPE tokenizer (GPT-2 style, as SmolLM2, Llama 3 and Qwen use) every
    token stands for at least one byte of the rendered prompt, so a prompt whose UTF-8 length
    is within the budget fits without tokenizing it. Only a longer one is counted exactly:
    tokenizing was 8 % of the Telegram gateway's CPU per update.

    A longer prompt is rendered once and counted in pieces: a fast tokenizer splits its input
    at the added tokens (`<|im_start|>`, `<|im_end|>` ...) before anything else, and tokenizes
    the text between them piece by piece, so the count is the added tokens plus each piece's
    count, and a piece's count (a message's role and text, mostly) is cached. A conversation's
    history is then tokenized once, not again on every turn (a 3.5 KB prompt took 1.8 ms to
    tokenize whole).
    """

    def __init__(self, tokenizer: Any, *, context_tokens: int, max_tokens: int) -> None:
        if max_tokens >= context_tokens:
            raise ValueError(f"max_tokens ({max_tokens}) must be below context ({context_tokens})")
        self._tokenizer = tokenizer
        self.budget = context_tokens - max_tokens
        self.bytes_bound_tokens = _bytes_bound_tokens(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # a tokenizer.json may carry its own truncation or padding: then only transformers'
        # call (which sets them per call) counts exactly
        self._encoder = (backend if backend is not None and backend.truncation is None
                         and backend.padding is None else None)
        # pieces count alike apart and together under byte-level BPE without a normalizer
        self._added = _added_tokens(self._encoder) if self.bytes_bound_tokens else None
        self._piece_tokens = functools.lru_cache(maxsize=PIECES_CACHED)(self._encoded_length)

    def render(self, messages: Sequence[ChatMessage]) -> str:
        return self._tokenizer.apply_chat_template(
            chat_dicts(messages), tokenize=False, add_generation_prompt=True)

    def count(self, messages: Sequence[ChatMessage]) -> int:
        """The prompt's exact length in tokens."""
        return self._tokens(messages, self.render(messages))

    def fits(self, messages: Sequence[ChatMessage]) -> bool:
        text = self.render(messages)
        if self.bytes_bound_tokens and len(text.encode()) <= self.budget:
            return True
        return self._tokens(messages, text) <= self.budget

    def _tokens(self, messages: Sequence[ChatMessage], rendered: str) -> int:
        """The length in tokens of `messages` rendered as `rendered`, as
        `apply_chat_template(tokenize=True)` counts it (the rendered text tokenized without
        added special tokens), which counts it for tokenizers without a fast backend."""
        if self._added is not None:
            pieces = self._added.split(rendered)  # text, added token, text, ...
            return len(pieces) // 2 + sum(self._piece_tokens(p) for p in pieces[::2] if p)
        if self._encoder is not None:
            return self._encoded_length(rendered)
        return self._template_tokens(messages)

    def _template_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """The count by the tokenizer's own `apply_chat_template(tokenize=True)`."""
        ids = self._tokenizer.apply_chat_template(
            chat_dicts(messages), tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return len(ids)

    def _encoded_length(self, text: str) -> int:
        return len(self._encoder.encode(text, add_special_tokens=False))

    def fit(
        self, system: str, history: Sequence[ChatMessage], question: str, *,
        examples: Sequence[ChatMessage] = (),
    ) -> list[ChatMessage]:
        """Drop the oldest turns until the prompt fits; raise if the question alone does not.
        `examples` (the answer memory's `reference_exchanges`) go between the system prompt
        and the history, and are dropped after the whole history if still too long."""
        head = [ChatMessage("system", system)] if system else []
        tail = [ChatMessage("user", question)]
        kept, shown = list(history), list(examples)
        while True:
            messages = head + shown + kept + tail
            if self.fits(messages):
                return messages
            if kept:  # the oldest exchange, never leaving an answer without its question
                kept = kept[2:] if len(kept) > 1 and kept[1].role == "assistant" else kept[1:]
            elif shown:
                shown = []
            else:
                raise ContextTooLong("the question alone does not fit the model's context")


def with_references(system: str, references: Sequence[tuple[str, str]]) -> str:
    """The system prompt with (question, answer) pairs from the answer memory appended as
    "approved answers to similar questions", for the model to answer from."""
    if not references:
        return system
    quoted = "\n".join(f"Q: {q}\nA: {a}" for q, a in references)
    return (f"{system}\n\nApproved answers to similar questions (use them if they answer "
            f"the question):\n{quoted}").strip()


def reference_exchanges(references: Sequence[tuple[str, str]]) -> list[ChatMessage]:
    """The same (question, answer) pairs as earlier exchanges of the conversation, the best
    last. Quoted in the system prompt alone, a small model seldom keeps to them; quoted there
    and shown as exchanges, the bundled 135M model follows the closest one (its answers
    between the answer memory's two thresholds: docs/benchmarks.md#answer-memory)."""
    return [ChatMessage(role, text) for q, a in reversed(references)
            for role, text in (("user", q), ("assistant", a))]


def _bytes_bound_tokens(tokenizer: Any) -> bool:
    """True if a text's UTF-8 length bounds its token count: a byte-level pre-tokenizer (each
    token is one or more bytes; special tokens match text of their own) and no normalizer
    (NFKC could lengthen the text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    pre = type(backend.pre_tokenizer).__name__ if backend.pre_tokenizer is not None else ""
    return backend.normalizer is None and pre == "ByteLevel"


def _added_tokens(backend: Any) -> re.Pattern[str] | None:
    """A pattern splitting text where `backend` (byte-level BPE without a normalizer: see
    `_bytes_bound_tokens`; a SentencePiece-style pre-tokenizer marks only the text's first
    piece) splits it first, at its added tokens (longest first, as it matches them),
    capturing them; None where pieces might not count alike alone and in the whole: added
    tokens that strip neighbouring spaces or match whole words only."""
    if backend is None:
        return None
    added = list(backend.get_added_tokens_decoder().values())
    if not added or any(t.lstrip or t.rstrip or t.single_word for t in added):
        return None
    contents = sorted({t.content for t in added}, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, contents)) + ")")

