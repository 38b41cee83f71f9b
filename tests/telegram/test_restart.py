"""The gateway killed mid-answer and restarted: no update lost, none answered twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from sqlalchemy import select

from storage.db import make_engine, session_factory
from storage.models import InboundEvent, Message
from tests.fakes.telegram_api import TOKEN
from tests.fakes.vllm_server import free_port
from tests.telegram.conftest import eventually

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def gateway_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.telegram.gateway_main"], cwd=ROOT,
                                env=env, stdout=out, stderr=out, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


async def _healthy(port: int, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient() as client:
        async def ok() -> bool:
            try:
                return (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
            except httpx.HTTPError:
                return False
        for _ in range(600):
            assert proc.poll() is None, "the gateway exited"
            if await ok():
                return
            await asyncio.sleep(0.1)
    raise AssertionError("the gateway did not start")


async def _group_message_recorded(db_url: str) -> None:
    """Wait until the gateway has recorded which message shows the group answer (it does
    just after sending it; a crash in between leaves that message behind)."""
    engine = make_engine(db_url)
    try:
        for _ in range(200):
            async with session_factory(engine)() as s:
                refs = (await s.execute(select(InboundEvent.shown_ref))).scalars().all()
            if any(refs):
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the group answer's message was never recorded")
    finally:
        await engine.dispose()


async def test_killed_mid_answer_and_restarted(fake, db_url, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    env = {**os.environ, "CHATLOOP_DATABASE_URL": db_url, "CHATLOOP_MODEL": str(model_dir),
           "TELEGRAM_BOT_TOKEN": TOKEN, "CHATLOOP_TELEGRAM_API_BASE": fake.base_url,
           "CHATLOOP_PORT": str(port), "CHATLOOP_TELEGRAM_DRAFT_INTERVAL_S": "0.05",
           "CHATLOOP_TELEGRAM_EDIT_INTERVAL_S": "0.05",
           "CHATLOOP_TELEGRAM_POLL_TIMEOUT_S": "1", "SCRIPTED_DELAY": "0.06",
           "CHATLOOP_EVENT_LEASE_S": "1"}  # the killed gateway's events: taken over after 1 s
    ann, team = fake.private(42, "Ann"), fake.group()
    log = tmp_path / "gateway.log"
    with gateway_process(env, log) as first:
        await _healthy(port, first)
        fake.say(ann, "q1")
        await eventually(lambda: fake.answers(ann["id"]), within=30)
        fake.say(ann, "q2")
        fake.mention(team, "q3")
        await eventually(lambda: any("q2" in d["text"] for d in fake.drafts)
                         and fake.sent(team["id"]))  # both answers are streaming
        await _group_message_recorded(db_url)
        os.killpg(first.pid, signal.SIGKILL)  # mid-answer: no clean shutdown at all
        first.wait(timeout=30)
    assert len(fake.answers(ann["id"])) == 1 and not fake.answers(team["id"])
    fake.say(ann, "q4")  # arrives while the gateway is down
    with gateway_process(env, log) as second:
        await _healthy(port, second)
        await eventually(lambda: len(fake.answers(ann["id"])) == 3 and fake.answers(team["id"]),
                         within=60)
        await eventually(lambda: not fake.updates, within=10)  # everything confirmed
        engine = make_engine(db_url)
        sessions = session_factory(engine)
        for _ in range(200):  # an event closes just after its answer is shown (mark_delivered)
            async with sessions() as s:
                events = (await s.execute(select(InboundEvent))).scalars().all()
            if len(events) == 4 and all(e.status == "done" for e in events):
                break
            await asyncio.sleep(0.05)
    heads = [m["text"].split(":")[0] for m in fake.answers(ann["id"]) + fake.answers(team["id"])]
    assert heads == ["Answer to q1", "Answer to q2", "Answer to q4", "Answer to q3"]
    assert len(fake.sent(team["id"])) == 1  # the half-streamed group answer was continued
    async with sessions() as s:
        answers = (await s.execute(select(Message).where(Message.role == "assistant"))
                   ).scalars().all()
    await engine.dispose()
    assert sorted(e.status for e in events) == ["done"] * 4
    assert sorted(a.text.split(":")[0] for a in answers) == sorted(heads)
    assert all(a.status == "ok" for a in answers)
