"""`chatloop forget`, `chatloop audit` and the audited operator commands, as an operator runs
them (real processes; SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from bots.core import ConversationCore, CoreLimits, InboundMessage
from feedback import erasure
from feedback.loop import run_cycle
from inference.prompt import PromptFitter
from storage.models import Conversation, Feedback, Message, TrainingRun, utcnow
from tests.conftest import ROOT
from tests.fakes.inference import ScriptedBackend
from tests.fakes.sinks import RecordingSink
from tests.feedback.conftest import loop_config

REVIEWER = "telegram:111"
ME = f"cli:{getpass.getuser()}"


def env(url: str, tmp_path: Path) -> dict[str, str]:
    trainer = f"{sys.executable} -m tests.feedback.fake_trainer regress 0"
    return {**os.environ, "CHATLOOP_DATABASE_URL": url,
            "CHATLOOP_ADAPTERS_DIR": str(tmp_path / "adapters"),
            "CHATLOOP_LEARN_RUNS_DIR": str(tmp_path / "runs"),
            "CHATLOOP_LEARN_HELDOUT_PERCENT": "0",
            "CHATLOOP_LEARN_TRAIN_COMMAND": trainer}


async def chatloop(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "chatloop.cli", *args], cwd=ROOT,
        capture_output=True, text=True, timeout=300, env=env(url, tmp_path))
    assert done.returncode == 0, done.stderr
    return done


async def ask(core: ConversationCore, user: str, text: str) -> int:
    """A Telegram private chat's question (the chat is the user's), answered."""
    msg = InboundMessage(channel="telegram", event_id=f"{user}-{text}", chat_id=user,
                         user_id=user, text=text)
    result = await core.handle(msg, RecordingSink())
    assert result.answer_id is not None
    return result.answer_id


async def test_forget_audit_and_the_audited_commands(db_url, sessions, tokenizer, tmp_path,
                                                     model_dir) -> None:  # type: ignore[no-untyped-def]
    core = ConversationCore(
        sessions=sessions, backend=ScriptedBackend(answer=lambda r: "I don't know."),
        fitter=PromptFitter(tokenizer, context_tokens=2048, max_tokens=64),
        system_prompt="Be brief.", limits=CoreLimits(max_tokens=64), reviewers={REVIEWER})
    for i in range(2):
        answer = await ask(core, "123", f"Where is my walrus parcel {i}?")
        await core.correct(answer_id=answer, voter_id=REVIEWER, text=f"Walrus depot {i}.",
                           source="telegram")
        answer = await ask(core, "456", f"Where is my box {i}?")
        await core.correct(answer_id=answer, voter_id=REVIEWER, text=f"Depot {i}.",
                           source="telegram")
    cfg = loop_config(tmp_path, model_dir, fake="pass 0")
    assert (await run_cycle(sessions, ScriptedBackend(), cfg, trigger="manual")).adapter == "fb-v1"
    async with sessions() as s:
        stored = (await s.execute(select(Message.author_id)
                                  .where(Message.text.contains("walrus")))).scalars().first()
        bob = (await s.execute(select(Message.author_id, Message.conversation_id)
                               .where(Message.text.contains("box")))).first()
    pending = []
    for text in ("Try the depot.", "No idea."):
        answer = await ask(core, "456", text)
        pending.append((await core.correct(answer_id=answer, voter_id=bob.author_id,
                                           text=text, source="telegram")).id)

    for i in range(2):  # new data since run 1: the retrain trains on it, judged on Bob's
        answer = await ask(core, "789", f"Where is my kayak {i}?")
        await core.correct(answer_id=answer, voter_id=REVIEWER, text=f"Kayak dock {i}.",
                           source="telegram")

    await chatloop(db_url, tmp_path, "adapters", "promote", "fb-v1")
    await chatloop(db_url, tmp_path, "review", "--approve", str(pending[0]))
    await chatloop(db_url, tmp_path, "review", "--reject", str(pending[1]))
    who = "telegram:123" if stored == "telegram:123" else stored  # as the operator types it
    forgot = await chatloop(db_url, tmp_path, "forget", who, "--retrain")
    assert f"forgot {who}: deleted 4 messages, 2 votes and corrections, 2 event payloads, " \
           "1 conversations; removed" in forgot.stdout
    assert "tainted: runs #1; adapters fb-v1" in forgot.stdout
    assert "run #2: rejected fb-v2" in forgot.stdout  # the gate said no (a fake trainer)
    job = json.loads((tmp_path / "runs/run-2/job.json").read_text())
    assert job["parent_path"] is None  # from the base model, though fb-v1 is active
    listed = (await chatloop(db_url, tmp_path, "adapters", "list")).stdout.splitlines()
    [fb1] = [line for line in listed if line.startswith("fb-v1")]
    assert "active" in fb1 and "tainted" in fb1
    async with sessions() as s:
        assert not (await s.execute(select(Message).where(Message.author_id == stored))).all()
        run2 = await s.get(TrainingRun, 2)
        assert run2 is not None and run2.trigger == "forget"

    await chatloop(db_url, tmp_path, "forget", "--conversation", str(bob.conversation_id))
    async with sessions() as s:
        assert await s.get(Conversation, bob.conversation_id) is None
        assert not (await s.execute(select(Feedback).where(Feedback.id.in_(pending)))).all()
    await chatloop(db_url, tmp_path, "adapters", "rollback")
    await ask(core, "789", "An old question")
    async with sessions() as s:  # from two days ago
        await s.execute(update(Message).where(Message.text.contains("old question"))
                        .values(created_at=utcnow() - timedelta(days=2)))
        await s.commit()
    retained = await erasure.apply_retention(sessions, days=1, runs_dir=tmp_path / "runs")
    assert retained.erased.counts["messages"] == 2

    lines = (await chatloop(db_url, tmp_path, "audit")).stdout.splitlines()
    assert [line.split()[2:5] for line in lines] == [
        ["system:retention", "retention", "older"],
        [ME, "rollback", "adapter:fb-v1"],
        [ME, "forget", f"conversation:{bob.conversation_id}"],
        [ME, "forget", lines[3].split()[4]],
        [ME, "reject", f"feedback:{pending[1]}"],
        [ME, "approve", f"feedback:{pending[0]}"],
        [ME, "promote", "adapter:fb-v1"]]
    assert lines[3].split()[4].startswith("identity:") and stored not in "\n".join(lines)
    newest = (await chatloop(db_url, tmp_path, "audit", "--limit", "1")).stdout.splitlines()
    assert len(newest) == 1 and "retention" in newest[0]
