"""Shared pieces of the answer-memory tests: one embedder per session, a core factory."""

from __future__ import annotations

import os

import pytest
from transformers import AutoTokenizer

from bots.core import ConversationCore, CoreLimits, InboundMessage
from bots.core.memory import AnswerMemory
from chatloop.settings import Settings
from inference.memory import HybridIndex, load_embedder
from inference.prompt import PromptFitter
from tests.fakes.inference import ScriptedBackend

REVIEWER = "telegram:900"


@pytest.fixture(scope="session")
def embedder():  # type: ignore[no-untyped-def]
    return load_embedder(os.environ["CHATLOOP_MEMORY_EMBEDDER"])  # the default: minilm


@pytest.fixture(scope="module")
def tokenizer(model_dir):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(model_dir)


def make_memory(sessions, embedder, **kw) -> AnswerMemory:  # type: ignore[no-untyped-def]
    """The gateway's memory (chatloop.app.answer_memory): its answers in the company's voice."""
    return AnswerMemory(sessions, HybridIndex(embedder), answer_at=kw.pop("answer_at", 0.85),
                        refer_at=kw.pop("refer_at", 0.55), refresh_s=kw.pop("refresh_s", 0.2),
                        voice=Settings(_env_file=None).learn.memory_voice(), **kw)


def make_core(sessions, tokenizer, memory, backend=None) -> ConversationCore:  # type: ignore[no-untyped-def]
    return ConversationCore(
        sessions=sessions, backend=backend or ScriptedBackend(),
        fitter=PromptFitter(tokenizer, context_tokens=2048, max_tokens=128),
        system_prompt="Be brief.", limits=CoreLimits(max_tokens=128),
        reviewers=frozenset({REVIEWER}), memory=memory)


def message(channel: str, user: str, text: str, event: str, chat: str = "c1") -> InboundMessage:
    return InboundMessage(channel=channel, event_id=event, chat_id=chat, user_id=user, text=text)
