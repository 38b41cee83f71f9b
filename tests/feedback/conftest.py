"""Learning-loop fixtures: a conversation core on real storage, feedback written through it."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from bots.core import ConversationCore, CoreLimits, InboundMessage, Router
from feedback.dataset import DatasetPolicy
from feedback.loop import LoopConfig
from inference.prompt import PromptFitter
from tests.fakes.inference import ScriptedBackend
from tests.fakes.sinks import RecordingSink

REVIEWER = "test:reviewer-1"  # an identity, channel:id, like every voter


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(model_dir)


def make_core(sessions, tokenizer, backend=None, router: Router | None = None):  # type: ignore[no-untyped-def]
    return ConversationCore(
        sessions=sessions, backend=backend or ScriptedBackend(answer=lambda r: "I don't know."),
        fitter=PromptFitter(tokenizer, context_tokens=2048, max_tokens=64),
        system_prompt="Be brief.", limits=CoreLimits(max_tokens=64, rate_limit_per_minute=10_000),
        router=router, reviewers=frozenset({REVIEWER}))


@dataclass
class Asker:
    """Simulated users: each `ask` is a new conversation (its own chat) unless `chat` is given;
    `user` is the asker's identity (its channel is the conversation's)."""

    core: ConversationCore
    n: int = 0

    async def ask(self, question: str, *, chat: str | None = None,
                  user: str = "test:u1") -> int:
        self.n += 1
        key = uuid.uuid4().hex[:12]
        channel, _, user_id = user.partition(":")
        msg = InboundMessage(channel=channel, event_id=f"e{key}", chat_id=chat or f"c{key}",
                             user_id=user_id, text=question)
        result = await self.core.handle(msg, RecordingSink())
        assert result.answer_id is not None
        return result.answer_id


def loop_config(tmp_path: Path, model_dir: Path, *, fake: str | None = None,
                **overrides) -> LoopConfig:  # type: ignore[no-untyped-def]
    """A LoopConfig under tmp_path; `fake` = "MODE SECONDS" uses tests/feedback/fake_trainer."""
    kwargs = dict(min_new_feedback=1, heartbeat_s=0.5,
                  dataset=DatasetPolicy(heldout_percent=50, system_prompt="Be brief."))
    cfg = LoopConfig(model_dir=str(model_dir), adapters_dir=tmp_path / "adapters",
                     runs_dir=tmp_path / "runs", **{**kwargs, **overrides})
    if fake:
        cfg.train_command = [sys.executable, "-m", "tests.feedback.fake_trainer", *fake.split()]
    return cfg


async def eventually(check: Callable[[], Awaitable[object]], *, within: float = 60) -> object:
    """Poll `check` until it returns something truthy (and return that), or fail."""
    for _ in range(int(within / 0.05)):
        if found := await check():
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"not true within {within}s")
