"""The scheduler keeps no code in the database: job definitions come from code, the job table
holds only schedule state; and every scheduler leaves a heartbeat the trainer's health check
reads (`chatloop health trainer`)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from sqlalchemy import create_engine, text

from chatloop.app import adapter_source
from feedback.scheduler import LearningScheduler, ScheduleConfig, sync_url
from inference.registry import AdapterRegistry
from storage.db import make_engine, session_factory
from tests.fakes.inference import ScriptedBackend
from tests.feedback.conftest import eventually, loop_config

ROOT = Path(__file__).resolve().parents[2]
SCHEDULE = ScheduleConfig(check_every=timedelta(hours=1), canary_every=timedelta(hours=1),
                          cron=None, lease_ttl=timedelta(seconds=8))


class Planted:
    """What someone with write access to the database could store as a job: unpickling it
    runs code (here: it writes a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.write_text, (self.marker, "ran"))


def scheduler(db_url: str, tmp_path: Path, model_dir: Path) -> LearningScheduler:
    engine = make_engine(db_url)
    sessions, backend = session_factory(engine), ScriptedBackend()
    return LearningScheduler(engine=engine, sessions=sessions, backend=backend,
                             adapters=AdapterRegistry(backend, source=adapter_source(sessions)),
                             loop=loop_config(tmp_path, model_dir, fake="pass 0"),
                             schedule=SCHEDULE, database_url=db_url, key=f"s{id(engine)}")


async def test_rows_in_the_job_table_are_never_unpickled(db_url: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                         model_dir: Path) -> None:
    sched = scheduler(db_url, tmp_path, model_dir)
    assert await sched.tick()  # creates the table and the jobs
    await sched.close()
    marker = tmp_path / "planted-job-ran"
    store = create_engine(sync_url(db_url))
    with store.begin() as conn:  # a planted job, due now, and a planted state for a real one
        for job_id in ("planted", "learn-threshold"):
            conn.execute(text("DELETE FROM apscheduler_jobs WHERE id = :id"), {"id": job_id})
            conn.execute(text("INSERT INTO apscheduler_jobs (id, next_run_time, job_state) "
                              "VALUES (:id, 0, :state)"),
                         {"id": job_id, "state": pickle.dumps(Planted(marker))})
    restarted = scheduler(db_url, tmp_path, model_dir)
    try:
        assert await restarted.tick()

        async def planted_row_gone() -> bool:
            with store.connect() as conn:
                return conn.execute(text("SELECT count(*) FROM apscheduler_jobs "
                                         "WHERE id = 'planted'")).scalar() == 0

        await eventually(planted_row_gone, within=20)
        assert not marker.exists()
        with store.connect() as conn:
            rows = dict(conn.execute(text("SELECT id, job_state FROM apscheduler_jobs")).all())
        assert sorted(rows) == ["learn-canary", "learn-threshold"]
        for state in rows.values():  # a description for people, in JSON: no pickle
            about = json.loads(bytes(state))
            assert about["func"].startswith("feedback.scheduler:")
    finally:
        await restarted.close()
        store.dispose()
    assert not marker.exists()


def health(db_url: str, *, host_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CHATLOOP_DATABASE_URL": db_url, **(host_env or {})}
    return subprocess.run([sys.executable, "-m", "chatloop.cli", "health", "trainer"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)


async def test_the_trainer_is_healthy_only_while_its_scheduler_beats(  # type: ignore[no-untyped-def]
        db_url: str, tmp_path: Path, model_dir: Path) -> None:
    before = health(db_url)
    assert before.returncode == 1 and "no fresh scheduler heartbeat" in before.stderr
    sched = scheduler(db_url, tmp_path, model_dir)
    try:
        await sched.tick()
        beating = health(db_url)
        assert beating.returncode == 0, beating.stderr
    finally:
        await sched.close()

    async def stale() -> bool:  # nobody renews it: stale after the lease TTL (8 s)
        return health(db_url).returncode == 1

    await eventually(stale, within=60)
    unreachable = health("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    assert unreachable.returncode == 1 and "database unreachable" in unreachable.stderr
