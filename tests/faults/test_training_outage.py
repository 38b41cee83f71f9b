"""The learning loop against database faults: PostgreSQL away for ~10 s in the middle of a
training run, and a run failed as stale by another one while it trained."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from feedback.loop import run_cycle
from storage import adapters, runs
from storage.models import TrainingRun, utcnow
from tests.fakes.inference import ScriptedBackend
from tests.faults.conftest import Tally
from tests.faults.pgserver import OwnPostgres
from tests.feedback.conftest import eventually, loop_config
from tests.feedback.conftest import tokenizer as tokenizer  # noqa: F401  (the fixture)
from tests.feedback.test_loop import corrected

pytestmark = [pytest.mark.postgres, pytest.mark.faults]

TRAIN_AWAY_S = 10.0


async def _runs(sessions) -> list[TrainingRun]:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        return list((await s.execute(select(TrainingRun).order_by(TrainingRun.id)
                                     .execution_options(populate_existing=True))).scalars())


async def test_a_training_run_survives_the_database_going_away(  # type: ignore[no-untyped-def]
        own_pg: OwnPostgres, pg_sessions, tokenizer, tmp_path, model_dir, tally: Tally,
        caplog) -> None:
    sessions = pg_sessions
    await corrected(sessions, tokenizer)
    cfg = loop_config(tmp_path, model_dir, fake=f"pass {TRAIN_AWAY_S + 6}", heartbeat_s=0.5,
                      stale_after=timedelta(seconds=60))
    backend = ScriptedBackend()
    first = asyncio.create_task(run_cycle(sessions, backend, cfg, trigger="manual"))
    await eventually(lambda: _started(tmp_path), within=60)  # the trainer is running

    tally.inject(f"PostgreSQL stopped for {TRAIN_AWAY_S:.0f} s while the run trains")
    await asyncio.to_thread(own_pg.stop)
    stopped = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - a trigger meanwhile cannot even start
        await run_cycle(sessions, backend, cfg, trigger="threshold")
    await asyncio.sleep(max(0.0, TRAIN_AWAY_S - (time.monotonic() - stopped)))
    await asyncio.to_thread(own_pg.start)
    back = utcnow()

    async def beating() -> bool:
        [run] = await _runs(sessions)
        return run.status == "running" and run.heartbeat_at > back
    await eventually(beating, within=30)  # the heartbeat outlived the outage
    second = await run_cycle(sessions, backend, cfg, trigger="threshold")
    result = await asyncio.wait_for(first, 120)

    all_runs = await _runs(sessions)
    async with sessions() as s:
        canaries = [v for v in await adapters.all_versions(s) if v.status == "canary"]
    failed_beats = sum("heartbeat of run" in r.getMessage() for r in caplog.records)
    tally.count(first=result.status, second_trigger=second.status, runs=len(all_runs),
                canaries=len(canaries), failed_heartbeats=failed_beats)
    assert result.status == "succeeded" and second.status == "busy"
    assert [r.status for r in all_runs] == ["succeeded"]
    assert len(canaries) == 1 and failed_beats >= 1


async def _started(tmp_path) -> bool:  # type: ignore[no-untyped-def]
    return any(tmp_path.glob("runs/*/train.log"))


async def test_a_run_failed_as_stale_meanwhile_registers_nothing(  # type: ignore[no-untyped-def]
        pg_sessions, tokenizer, tmp_path, model_dir, tally: Tally) -> None:
    sessions = pg_sessions
    await corrected(sessions, tokenizer)
    cfg = loop_config(tmp_path, model_dir, fake="pass 4", heartbeat_s=30)
    backend = ScriptedBackend()
    first = asyncio.create_task(run_cycle(sessions, backend, cfg, trigger="manual"))
    await eventually(lambda: _started(tmp_path), within=60)
    tally.inject("another run takes over the lease (the first counted as stale)")
    async with sessions() as s:
        taker = await runs.start_run(s, trigger="manual", stale_after=timedelta(0))
    result = await asyncio.wait_for(first, 120)
    all_runs = await _runs(sessions)
    async with sessions() as s:
        versions = await adapters.all_versions(s)
    tally.count(first=result.status, runs=[r.status for r in all_runs], versions=len(versions))
    assert taker is not None and result.status == "failed"
    assert [r.status for r in all_runs] == ["failed", "running"]
    assert "stopped heartbeating" in (all_runs[0].error or "")  # not overwritten by its end
    name = adapters.adapter_name(cfg.adapter_prefix, all_runs[0].id)
    assert versions == [] and not (tmp_path / "adapters" / name).exists()
    assert backend.adapters == set()
