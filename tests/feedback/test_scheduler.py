"""Leader election, the persistent job store, and one run for two schedulers on PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from apscheduler.jobstores.memory import MemoryJobStore
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import OperationalError

from chatloop.app import adapter_source
from feedback.scheduler import (
    LearningScheduler,
    LeaseLeadership,
    RetryingAsyncIOScheduler,
    ScheduleConfig,
    sync_url,
)
from inference.registry import AdapterRegistry
from storage.db import make_engine, session_factory
from storage.models import TrainingRun
from tests.fakes.inference import ScriptedBackend
from tests.feedback.conftest import REVIEWER, Asker, eventually, loop_config, make_core

FAST = ScheduleConfig(check_every=timedelta(seconds=0.5), canary_every=timedelta(hours=1),
                      cron=None, lease_ttl=timedelta(seconds=30))


async def test_a_lease_has_one_holder_until_it_expires(sessions) -> None:  # type: ignore[no-untyped-def]
    a = LeaseLeadership(sessions, holder="a", ttl=timedelta(seconds=1))
    b = LeaseLeadership(sessions, holder="b", ttl=timedelta(seconds=1))
    assert await a.acquire() and not await b.acquire()
    assert await a.acquire()  # renewal
    await asyncio.sleep(1.2)  # a stopped renewing
    assert await b.acquire() and not await a.acquire()
    await b.release()
    assert await a.acquire()


async def test_the_scheduler_keeps_waking_after_a_job_store_error() -> None:
    """APScheduler's asyncio scheduler stops for good when saving a job's next run time fails
    (seen as "database is locked" on SQLite while a training run wrote); ours logs the error
    and wakes again."""
    failures = []

    class LockedOnce(MemoryJobStore):
        def update_job(self, job):  # type: ignore[no-untyped-def]
            if not failures:
                failures.append(job.id)
                raise OperationalError("UPDATE apscheduler_jobs ...", {},
                                       Exception("database is locked"))
            super().update_job(job)

    runs: list[int] = []
    aps = RetryingAsyncIOScheduler(jobstores={"default": LockedOnce()},
                                   jobstore_retry_interval=0.1)
    aps.add_job(runs.append, "interval", args=[1], seconds=0.05, id="tick")
    aps.start()
    try:
        for _ in range(100):
            if len(runs) >= 3:
                break
            await asyncio.sleep(0.05)
    finally:
        aps.shutdown(wait=False)
    assert failures == ["tick"] and len(runs) >= 3


def scheduler(db_url: str, tmp_path, model_dir, fake: str) -> LearningScheduler:  # type: ignore[no-untyped-def]
    engine = make_engine(db_url)  # its own engine and pool: a separate process in miniature
    sessions, backend = session_factory(engine), ScriptedBackend()
    return LearningScheduler(engine=engine, sessions=sessions, backend=backend,
                             adapters=AdapterRegistry(backend, source=adapter_source(sessions)),
                             loop=loop_config(tmp_path, model_dir, fake=fake), schedule=FAST,
                             database_url=db_url, key=f"s{id(engine)}")


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)
async def test_two_schedulers_on_one_postgres_database_start_one_run(
        db_url, sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer)
    for question in ("How long does delivery take?", "When will my parcel come?"):
        answer = await Asker(core).ask(question)  # one trained on, one held out for the gate
        await core.correct(answer_id=answer, voter_id=REVIEWER, text="3 days.", source="test")
    first, second = (scheduler(db_url, tmp_path, model_dir, "pass 1") for _ in range(2))
    try:
        assert [await first.tick(), await second.tick()] == [True, False]

        async def finished() -> list[TrainingRun]:
            async with sessions() as s:
                rows = (await s.execute(select(TrainingRun))).scalars().all()
            return [r for r in rows if r.status != "running"]

        [run] = await eventually(finished)
        await asyncio.sleep(1.5)  # more threshold checks: the canary now blocks new runs
        async with sessions() as s:
            assert len((await s.execute(select(TrainingRun))).scalars().all()) == 1
        assert run.status == "succeeded" and run.trigger == "threshold"
        assert second.results == [] and not second.leading
        await first.close()  # the leader stops: the standby takes over on its next tick
        assert await second.tick()
    finally:
        await first.close()
        await second.close()


async def test_jobs_are_kept_in_the_database_across_restarts(db_url, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    schedule = ScheduleConfig(cron="0 3 * * 0")
    sched = scheduler(db_url, tmp_path, model_dir, "pass 0")
    sched.schedule = schedule
    assert await sched.tick()
    await sched.close()
    store = create_engine(sync_url(db_url))
    query = text("SELECT id, next_run_time FROM apscheduler_jobs ORDER BY id")
    with store.connect() as conn:
        before = conn.execute(query).all()
    assert [r.id for r in before] == ["learn-canary", "learn-cron", "learn-threshold"]
    restarted = scheduler(db_url, tmp_path, model_dir, "pass 0")
    restarted.schedule = schedule
    assert await restarted.tick()
    with store.connect() as conn:
        after = conn.execute(query).all()
    assert [r.id for r in after] == [r.id for r in before]  # replaced, not duplicated
    cron = {r.id: r.next_run_time for r in after}["learn-cron"]
    assert cron == {r.id: r.next_run_time for r in before}["learn-cron"]
    await restarted.close()
    store.dispose()
