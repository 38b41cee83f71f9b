"""Fit a conversation into the model's context window with the tokenizer's chat template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from inference.base import ChatMessage
from inference.errors import ContextTooLong


class PromptFitter:
    """Keeps the system prompt and the question, and as much recent history as fits."""

    def __init__(self, tokenizer: Any, *, context_tokens: int, max_tokens: int) -> None:
        if max_tokens >= context_tokens:
            raise ValueError(f"max_tokens ({max_tokens}) must be below context ({context_tokens})")
        self._tokenizer = tokenizer
        self.budget = context_tokens - max_tokens

    def count(self, messages: Sequence[ChatMessage]) -> int:
        ids = self._tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=True,
            add_generation_prompt=True,
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return len(ids)

    def fit(
        self, system: str, history: Sequence[ChatMessage], question: str
    ) -> list[ChatMessage]:
        """Drop the oldest turns until the prompt fits; raise if the question alone does not."""
        head = [ChatMessage("system", system)] if system else []
        tail = [ChatMessage("user", question)]
        kept = list(history)
        while True:
            messages = head + kept + tail
            if self.count(messages) <= self.budget:
                return messages
            if not kept:
                raise ContextTooLong("the question alone does not fit the model's context")
            # drop the oldest exchange, never leaving an answer without its question
            kept = kept[2:] if len(kept) > 1 and kept[1].role == "assistant" else kept[1:]
