"""Two gateway replicas with a 3 s lease; the one answering is SIGSTOPped for 10 s in the
middle of its answers and then continued: the other takes the events over once the leases run
out, and each event ends with one stored answer and one delivered message."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter

import pytest
from sqlalchemy import select

from storage.db import make_engine, session_factory
from storage.models import InboundEvent, Message
from tests.fakes.servers import serve_app
from tests.fakes.telegram_api import TOKEN, FakeTelegram
from tests.fakes.vllm_server import free_port
from tests.telegram.conftest import eventually
from tests.telegram.test_restart import _healthy, gateway_process

pytestmark = [pytest.mark.postgres, pytest.mark.faults]
SECRET = "stall-Secret_1"
STOPPED_S = 10.0


async def test_a_replica_stopped_mid_answer_answers_nothing_twice(
        pg_db, model_dir, tmp_path, tally) -> None:  # type: ignore[no-untyped-def]
    fake = FakeTelegram()
    async with serve_app(fake.app()) as api:
        def env(port: int) -> dict[str, str]:
            return {**os.environ, "CHATLOOP_DATABASE_URL": pg_db,
                    "CHATLOOP_MODEL": str(model_dir), "TELEGRAM_BOT_TOKEN": TOKEN,
                    "CHATLOOP_TELEGRAM_API_BASE": api, "CHATLOOP_PORT": str(port),
                    "CHATLOOP_TELEGRAM_MODE": "webhook", "CHATLOOP_TELEGRAM_WEBHOOK_SECRET": SECRET,
                    "CHATLOOP_TELEGRAM_WEBHOOK_URL": f"http://127.0.0.1:{port}/telegram/webhook",
                    "CHATLOOP_TELEGRAM_DRAFT_INTERVAL_S": "0.05", "SCRIPTED_DELAY": "0.15",
                    "CHATLOOP_EVENT_LEASE_S": "3"}
        port_a, port_b = free_port(), free_port()
        chats = [fake.private(3000 + i, f"user{i}") for i in range(3)]
        with gateway_process(env(port_b), tmp_path / "b.log") as b:
            await _healthy(port_b, b)
            with gateway_process(env(port_a), tmp_path / "a.log") as a:
                await _healthy(port_a, a)  # started last: the webhook points at A
                await eventually(lambda: fake.webhook and str(port_a) in fake.webhook["url"])
                for n, chat in enumerate(chats):
                    fake.say(chat, f"q{n}")
                await eventually(lambda: all(any(f"q{n}" in d["text"] for d in fake.drafts)
                                             for n in range(len(chats))), within=30)
                os.kill(a.pid, signal.SIGSTOP)
                tally.inject(f"replica A SIGSTOPped {STOPPED_S:.0f} s mid-answer (lease 3 s)")
                await asyncio.sleep(STOPPED_S)  # the stall itself
                by_b = sum(len(fake.answers(c["id"])) for c in chats)
                os.kill(a.pid, signal.SIGCONT)
                tally.inject("replica A continued")
                await eventually(lambda: sum(len(fake.answers(c["id"])) for c in chats)
                                 >= len(chats), within=30)
                await asyncio.sleep(4.0)  # A's stalled turns would store or send by now
    engine = make_engine(pg_db)
    async with session_factory(engine)() as s:
        answers = (await s.execute(select(Message).where(Message.role == "assistant"))
                   ).scalars().all()
        events = (await s.execute(select(InboundEvent))).scalars().all()
    await engine.dispose()
    delivered = Counter(m["text"].split(":")[0] for c in chats for m in fake.answers(c["id"]))
    stored = Counter(a.reply_to_id for a in answers)
    lost_leases = (tmp_path / "a.log").read_text().count("lost the lease")
    tally.count(answered_while_a_stopped=by_b, leases_lost_by_a=lost_leases,
                delivered=sum(delivered.values()), stored=len(answers),
                events=[e.status for e in events])
    tally.messages({f"Answer to q{n}": 1 for n in range(len(chats))}, dict(delivered))
    tally.doubled += sum(n - 1 for n in stored.values() if n > 1)
    # B resumes taken-over events one after another: at least one is done while A is stopped
    assert by_b >= 1, "B did not take the stalled events over"
    assert lost_leases >= 1, "A never noticed it had lost its leases"
    assert tally.lost == 0 and tally.doubled == 0
    assert all(a.status == "ok" for a in answers) and len(answers) == len(chats)
    assert sorted(e.status for e in events) == ["done"] * len(chats)
