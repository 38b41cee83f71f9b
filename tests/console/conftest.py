"""Console fixtures: the gateway app with only the console, operators, a signed-in client,
and a seeded history (answers over several days, votes, adapters, runs with a loss log)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from bots.console import Console
from bots.gateway import create_app
from chatloop.console import console_operations
from chatloop.settings import Settings
from feedback.canary import CanaryPolicy
from feedback.policy import DatasetPolicy
from storage import operators
from storage.models import (
    AdapterVersion,
    Conversation,
    Feedback,
    Message,
    RunFeedback,
    TrainingRun,
    utcnow,
)
from tests.telegram.conftest import fake, start_bot, tokenizer  # noqa: F401 (fixtures)

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
PASSWORDS = {"alice": "alice-password-1", "rob": "rob-password-1"}


def build_console(sessions: Any, tmp_path: Path, **options: Any) -> Console:
    settings = Settings(_env_file=None, learn={"runs_dir": str(tmp_path / "runs")})
    ops = console_operations(settings, sessions, canary_policy=CanaryPolicy(min_votes=5),
                             rules=DatasetPolicy(min_voters=1))
    return Console(sessions, ops, **options)


def console_app(console: Console) -> FastAPI:
    async def ready() -> dict[str, str]:
        return {"database": "ok"}

    return create_app(channels=[console], ready=ready)


async def add_operators(sessions: Any) -> None:
    """alice (admin) and rob (reviewer)."""
    async with sessions() as s:
        await operators.add_operator(s, name="alice", role="admin", password=PASSWORDS["alice"])
        await operators.add_operator(s, name="rob", role="reviewer", password=PASSWORDS["rob"])


async def sign_in(client: httpx.AsyncClient, name: str, password: str | None = None
                  ) -> httpx.Response:
    page = await client.get("/console/login")
    token = CSRF.search(page.text)
    assert token is not None
    return await client.post("/console/login", data={
        "csrf": token.group(1), "name": name, "password": password or PASSWORDS[name]})


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found is not None, "no CSRF token on the page"
    return found.group(1)


@pytest.fixture
async def console(sessions: Any, tmp_path: Path) -> Console:
    await add_operators(sessions)
    return build_console(sessions, tmp_path)


@pytest.fixture
async def client(console: Console) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=console_app(console), client=("192.0.2.10", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://console.test") as c:
        yield c


async def seed_history(sessions: Any, tmp_path: Path, *, days: int = 10) -> dict[str, Any]:
    """Conversations on two channels over `days` days, answered by the base model, an active
    and a canary adapter, with votes, a failure, two runs (one with a loss log) and their
    adapters. Returns some ids."""
    now = utcnow()
    log_dir = tmp_path / "runs" / "run-2"
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "train.log").write_text("".join(
        f"{{'loss': {2.4 * 0.85 ** i:.4f}, 'grad_norm': 1.0, 'epoch': {i / 10}}}\n"
        for i in range(24)) + "{'train_runtime': 12.0, 'train_loss': 1.2}\n" + "".join(
        f"{{'loss': {0.7 * 0.9 ** i:.4f}, 'epoch': {i / 10}}}\n" for i in range(12)))
    async with sessions() as s:
        run1 = TrainingRun(status="rejected", trigger="threshold", adapter_name="chatloop-v1",
                           started_at=now - timedelta(days=6), finished_at=now - timedelta(days=6),
                           error="held-out loss 1.2000 does not beat 1.1000",
                           metrics={"dataset": {"corrections_trained": 4,
                                                "corrections_heldout": 2,
                                                "corrections_carried_over": 0,
                                                "quarantined_votes": 3}})
        metrics = {"dataset": {"corrections_trained": 12, "corrections_heldout": 3,
                               "corrections_carried_over": 2, "quarantined_votes": 1,
                               "sft": 14, "kto": 20, "heldout": 3},
                   "candidate": {"heldout_loss": 0.82, "heldout_accuracy": 0.67,
                                 "golden_loss": 2.01},
                   "parent": {"heldout_loss": 1.37, "heldout_accuracy": 0.33,
                              "golden_loss": 2.0}}
        run2 = TrainingRun(status="succeeded", trigger="threshold", adapter_name="chatloop-v2",
                           started_at=now - timedelta(days=3), finished_at=now - timedelta(days=3),
                           metrics=metrics, log_path=str(log_dir / "train.log"))
        s.add_all([run1, run2])
        await s.flush()
        s.add_all([RunFeedback(run_id=run2.id, feedback_id=900 + i, revision=1,
                               role="trained" if i < 12 else "heldout") for i in range(15)])
        s.add_all([
            AdapterVersion(name="chatloop-v0", status="active", path="/x/v0", rank=8,
                           run_id=None, created_at=now - timedelta(days=9),
                           metrics=None),
            AdapterVersion(name="chatloop-v2", status="canary", path="/x/v2", rank=8,
                           parent_name="chatloop-v0", run_id=run2.id, metrics=metrics,
                           created_at=now - timedelta(days=3),
                           updated_at=now - timedelta(days=3)),
        ])
        questions = ["When do you open?", "How do I reset my password?",
                     "Do you ship to Canada?", "What is the refund policy?"]
        n = 0
        # an hour before now, or half-way since midnight UTC early in the day: each day's
        # conversations stay on that day whatever the time (the quality roll-up counts by day)
        back = min(timedelta(hours=1), (now - now.replace(hour=0, minute=0, second=0,
                                                          microsecond=0)) / 2)
        for day in range(days):
            when = now - timedelta(days=days - 1 - day) - back
            for k in range(6):
                n += 1
                channel = "telegram" if k % 2 else "slack"
                adapter = (None if day < 3 else "chatloop-v0" if day < 7 or k % 3
                           else "chatloop-v2")
                conv = Conversation(channel=channel, external_chat_id=f"chat{n}",
                                    created_at=when)
                s.add(conv)
                await s.flush()
                who = f"{channel}:{100 + k}" if channel == "telegram" else f"slack:T0/U{k}"
                q = Message(conversation_id=conv.id, role="user", text=questions[n % 4],
                            author_id=who, created_at=when)
                s.add(q)
                await s.flush()
                failed = (day + k) % 11 == 0
                a = Message(conversation_id=conv.id, role="assistant",
                            text="We open at 9am." if not failed else "",
                            reply_to_id=q.id, created_at=when + timedelta(seconds=2),
                            adapter=adapter, model="chatloop-base", prompt_tokens=40 + k,
                            completion_tokens=12 + k, ttft_ms=120.0 + 10 * k + day,
                            latency_ms=800.0 + 40 * k, status="failed" if failed else "ok",
                            error_kind="timeout" if failed else None)
                s.add(a)
                await s.flush()
                if not failed:
                    rating = -1 if (day * 7 + k) % 4 == 0 else 1
                    s.add(Feedback(answer_id=a.id, voter_id=who, rating=rating,
                                   source=channel, created_at=when, updated_at=when))
        await s.commit()
    return {"run": run2.id}
