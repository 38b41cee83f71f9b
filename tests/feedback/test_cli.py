"""The learning loop's operator commands: review, train --now, scheduler (real processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from feedback import review
from storage.db import make_engine, session_factory
from storage.migrate import upgrade_async
from storage.models import Lease
from tests.conftest import ROOT
from tests.feedback.conftest import Asker, make_core


@pytest.fixture
async def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    await upgrade_async(url)
    return url


def env(url: str, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "CHATLOOP_DATABASE_URL": url,
            "CHATLOOP_ADAPTERS_DIR": str(tmp_path / "adapters"),
            "CHATLOOP_LEARN_RUNS_DIR": str(tmp_path / "runs")}


async def chatloop(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "chatloop.cli", *args], cwd=ROOT,
        capture_output=True, text=True, timeout=180, env=env(url, tmp_path))


async def test_review_lists_and_approves_pending_corrections(sqlite_url, tmp_path,
                                                             tokenizer) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(sqlite_url)
    sessions = session_factory(engine)
    core = make_core(sessions, tokenizer)
    answer = await Asker(core).ask("Do you ship to Germany?")
    suggestion = await core.correct(answer_id=answer, voter_id="test:u7",
                                    text="Yes, for 14 pounds.", source="test")
    listed = await chatloop(sqlite_url, tmp_path, "review")
    assert listed.returncode == 0, listed.stderr
    assert "suggested: Yes, for 14 pounds." in listed.stdout and "1 pending" in listed.stdout
    done = await chatloop(sqlite_url, tmp_path, "review", "--approve", str(suggestion.id))
    assert done.returncode == 0 and "0 pending" in done.stdout
    async with sessions() as s:
        assert await review.pending(s) == []
    again = await chatloop(sqlite_url, tmp_path, "review", "--reject", str(suggestion.id))
    assert again.returncode == 2 and "no pending correction" in again.stderr
    await engine.dispose()


async def test_train_now_runs_one_cycle_by_hand(sqlite_url, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    assert (await chatloop(sqlite_url, tmp_path, "train")).returncode == 2  # needs --now
    done = await chatloop(sqlite_url, tmp_path, "train", "--now")
    assert done.returncode == 0, done.stderr
    assert "run #1: skipped" in done.stdout and "no training data" in done.stdout
    runs = await chatloop(sqlite_url, tmp_path, "runs")
    assert runs.stdout.split()[:3] == ["#1", "skipped", "manual"]


async def test_scheduler_leads_and_releases_its_lease_on_sigterm(sqlite_url, tmp_path,
                                                                 model_dir) -> None:  # type: ignore[no-untyped-def]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatloop.cli", "scheduler", cwd=ROOT, env=env(sqlite_url, tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    lines = []
    async with asyncio.timeout(120):
        async for line in proc.stdout:
            lines.append(line.decode())
            if "leading the learning loop scheduler" in lines[-1]:
                break
    engine = make_engine(sqlite_url)
    async with session_factory(engine)() as s:
        assert (await s.get(Lease, "learning-loop-scheduler")) is not None
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    async with session_factory(engine)() as s:
        assert (await s.get(Lease, "learning-loop-scheduler")) is None
    await engine.dispose()
