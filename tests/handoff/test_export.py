"""The agent's reply after a hand-off: a preference pair, exported as a DPO pair."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from bots.core import InboundMessage, Outcome
from storage.db import make_engine, session_factory
from storage.migrate import upgrade_async
from tests.fakes.inference import ScriptedBackend
from tests.fakes.sinks import RecordingSink
from tests.handoff.conftest import handoff_core

ROOT = Path(__file__).resolve().parents[2]


def _msg(n: int, text: str) -> InboundMessage:
    return InboundMessage(channel="telegram", event_id=str(n), chat_id="42", user_id="42",
                          text=text)


async def test_the_pair_is_stored_and_exported_as_a_dpo_pair(tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    await upgrade_async(url)
    engine = make_engine(url)
    core = handoff_core(session_factory(engine), tokenizer,
                        ScriptedBackend(answer=lambda r: "I do not know our refund policy."))
    answered = await core.handle(_msg(1, "How long do refunds take?"), RecordingSink())
    asked = await core.handle(_msg(2, "/human"), RecordingSink())
    assert asked.outcome == Outcome.ESCALATED and asked.handoff is not None
    relay = await core.handoff.agent_message(
        asked.handoff.id, agent="telegram:77", name="Maya",
        text="Refunds take five working days.", delivery=("telegram", "3"))
    assert relay is not None
    more = await core.handoff.agent_message(
        asked.handoff.id, agent="telegram:77", name="Maya",
        text="You get an email when it is done.", delivery=("telegram", "4"))
    assert more is not None
    await engine.dispose()
    out = tmp_path / "export.jsonl"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "chatloop.cli", "feedback", "export", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "CHATLOOP_DATABASE_URL": url, "CHATLOOP_LEARN_HELDOUT_PERCENT": "0"})
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    [pair] = [r for r in rows if r["kind"] == "dpo"]
    assert pair["chosen"] == ("Refunds take five working days.\n"
                              "You get an email when it is done.")
    assert pair["rejected"] == "I do not know our refund policy."
    assert pair["prompt"][-1] == {"role": "user", "content": "How long do refunds take?"}
    assert pair["answer_id"] == answered.answer_id and pair["split"] == "train"


async def test_an_agents_reply_becomes_an_answer_memory_entry_once_approved(  # type: ignore[no-untyped-def]
        tmp_path, tokenizer) -> None:
    """A trusted agent's reply is approved at once; another agent's waits for review."""
    from sqlalchemy import select

    from storage import feedback, memory
    from storage.models import MemoryEntry

    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    await upgrade_async(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    core = handoff_core(sessions, tokenizer,
                        ScriptedBackend(answer=lambda r: "I do not know our refund policy."))
    for n, (question, agent, reply) in enumerate([
            ("How long do refunds take?", "telegram:77", "Refunds take five working days."),
            ("Can I pay by invoice?", "telegram:88", "Yes, for orders above 500 pounds.")]):
        chat = f"chat-{n}"
        await core.handle(InboundMessage(channel="telegram", event_id=f"{n}-1", chat_id=chat,
                                         user_id=chat, text=question), RecordingSink())
        asked = await core.handle(InboundMessage(channel="telegram", event_id=f"{n}-2",
                                                 chat_id=chat, user_id=chat, text="/human"),
                                  RecordingSink())
        assert asked.handoff is not None
        assert await core.handoff.agent_message(asked.handoff.id, agent=agent, name="Maya",
                                                text=reply, delivery=("telegram", f"{n}-3"))

    async def entries() -> list[tuple[str, str, str | None]]:
        async with sessions() as s:
            return [(e.question, e.answer, e.approved_by) for e in
                    (await s.execute(select(MemoryEntry).order_by(MemoryEntry.id))).scalars()]

    assert await entries() == [("How long do refunds take?", "Refunds take five working days.",
                                "telegram:77")]
    async with sessions() as s:
        [pending] = await feedback.pending_corrections(s)
        assert pending.correction == "Yes, for orders above 500 pounds."
        assert await feedback.review_correction(s, feedback_id=pending.feedback_id, approve=True,
                                                actor="console:ana")
    assert (await entries())[1] == ("Can I pay by invoice?", "Yes, for orders above 500 pounds.",
                                    "console:ana")
    async with sessions() as s:
        assert [e.source for e in await memory.entries(s)] == ["correction", "correction"]
    await engine.dispose()
