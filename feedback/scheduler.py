"""The learning-loop scheduler: APScheduler 3 jobs, run only by the elected leader.

Exactly one scheduler leads across processes and replicas: on PostgreSQL it
holds a session-level advisory lock on a dedicated connection (released by the
server if the process dies); on SQLite it holds an expiring lease row. Only the
leader starts APScheduler, whose jobs (threshold check, periodic cron run,
canary evaluation) are defined here, in code, with stable ids; the database keeps
only their schedule state (next run times, `feedback.jobstore`: no pickles, so write
access to the database is not code execution in the trainer); misfires are coalesced
within a grace time. Whatever triggers a cycle, the run lease lets only one run at a
time. Every scheduler, leading or standing by, writes a heartbeat row on each tick
(`chatloop health trainer` checks it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from feedback.canary import CanaryPolicy, evaluate_canary
from feedback.erasure import apply_retention
from feedback.jobstore import ScheduleStateStore
from feedback.loop import LoopConfig, run_cycle, should_train
from inference.base import InferenceBackend
from inference.registry import AdapterRegistry
from storage import locks

log = logging.getLogger(__name__)

LEADER_LEASE = "learning-loop-scheduler"
ADVISORY_KEY = 0x636C_6F6F_7001  # "cloop" + 1: one lock id for the whole cluster


class Leadership(Protocol):
    async def acquire(self) -> bool:
        """Become (or stay) the leader; False while another process leads."""

    async def release(self) -> None: ...


class LeaseLeadership:
    """An expiring lease row, renewed by the holder; works on SQLite and PostgreSQL."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, holder: str,
                 ttl: timedelta) -> None:
        self._sessions, self.holder, self._ttl = sessions, holder, ttl

    async def acquire(self) -> bool:
        async with self._sessions() as s:
            return await locks.acquire_lease(s, name=LEADER_LEASE, holder=self.holder,
                                             ttl=self._ttl)

    async def release(self) -> None:
        async with self._sessions() as s:
            await locks.release_lease(s, name=LEADER_LEASE, holder=self.holder)


class AdvisoryLeadership:
    """A PostgreSQL session-level advisory lock held on its own connection."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._conn: AsyncConnection | None = None

    async def acquire(self) -> bool:
        if self._conn is not None:
            try:  # still ours while the connection lives
                await locks.ping(self._conn)
                return True
            except Exception:  # the connection died: so did the lock
                await self.release()
        conn = await self._engine.connect()
        if await locks.try_advisory_lock(conn, key=ADVISORY_KEY):
            self._conn = conn
            return True
        await conn.close()
        return False

    async def release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await locks.advisory_unlock(conn, key=ADVISORY_KEY)
            except Exception:
                pass
            await conn.close()


def leadership_for(engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], *,
                   holder: str, ttl: timedelta) -> Leadership:
    if engine.dialect.name == "postgresql":
        return AdvisoryLeadership(engine)
    return LeaseLeadership(sessions, holder=holder, ttl=ttl)


def sync_url(url: str) -> str:
    """The job store's (synchronous) driver for the app's database URL."""
    u = make_url(url)
    if u.drivername.startswith("sqlite"):
        u = u.set(drivername="sqlite")
    elif u.drivername.startswith("postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


class RetryingAsyncIOScheduler(AsyncIOScheduler):
    """APScheduler 3's asyncio scheduler, which stops waking up for good when its job store
    raises while saving a job's next run time (`update_job`, e.g. on a locked SQLite
    database): the jobs would silently never run again in this process. Here the error is
    logged and the scheduler wakes again after `jobstore_retry_interval`."""

    def wakeup(self) -> None:
        self._stop_timer()
        try:
            wait_seconds = self._process_jobs()
        except Exception:
            log.exception("job store error; the scheduler retries in %s s",
                          self.jobstore_retry_interval)
            wait_seconds = self.jobstore_retry_interval
        self._start_timer(wait_seconds)


@dataclass(frozen=True)
class ScheduleConfig:
    check_every: timedelta = timedelta(minutes=5)
    canary_every: timedelta = timedelta(minutes=5)
    cron: str | None = "0 3 * * 0"  # a periodic run (crontab syntax); None: no cron job
    misfire_grace: timedelta = timedelta(minutes=30)
    lease_ttl: timedelta = timedelta(seconds=60)
    canary: CanaryPolicy = CanaryPolicy()
    retention_days: int | None = None  # CHATLOOP_RETENTION_DAYS; None: no retention job
    retention_cron: str = "15 4 * * *"  # daily, at a fixed time whatever restarts the leader


# APScheduler's persistent store pickles a job's function by reference and its kwargs by
# value: jobs are module functions that find their live scheduler through this table.
_LIVE: dict[str, LearningScheduler] = {}


async def threshold_job(key: str) -> None:
    sched = _LIVE.get(key)
    if sched is not None:
        await sched.check()


async def cron_job(key: str) -> None:
    sched = _LIVE.get(key)
    if sched is not None:
        await sched.cycle("cron")


async def canary_job(key: str) -> None:
    sched = _LIVE.get(key)
    if sched is not None:
        await sched.canary()


async def retention_job(key: str) -> None:
    sched = _LIVE.get(key)
    if sched is not None:
        await sched.retention()


class LearningScheduler:
    """Elects a leader and, while leading, runs the learning-loop jobs."""

    def __init__(self, *, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession],
                 backend: InferenceBackend, adapters: AdapterRegistry, loop: LoopConfig,
                 schedule: ScheduleConfig, database_url: str, key: str | None = None) -> None:
        self.sessions, self.backend = sessions, backend
        self.adapters = adapters  # keeps this host's backend serving what the loop decided
        self.loop_cfg, self.schedule = loop, schedule
        self.key = key or "default"
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"[:128]
        self.leadership = leadership_for(engine, sessions, holder=self.holder,
                                         ttl=schedule.lease_ttl)
        self._url = sync_url(database_url)
        self._aps: AsyncIOScheduler | None = None
        self.results: list[Any] = []  # what this scheduler's jobs did (for status and tests)

    @property
    def leading(self) -> bool:
        return self._aps is not None

    async def tick(self) -> bool:
        """Acquire or renew leadership; start or stop the jobs to match. Returns leading."""
        try:
            lead = await self.leadership.acquire()
        except Exception as exc:  # the database is away: stop leading until it is back
            log.warning("leadership check failed: %s", exc)
            lead = False
        if lead and self._aps is None:
            self._start_jobs()
        elif not lead and self._aps is not None:
            self._stop_jobs()
            log.warning("lost the learning loop leadership: jobs stopped")
        await self._beat()
        return lead

    async def _beat(self) -> None:
        """This process is alive and reaches the database (the trainer's health check)."""
        try:
            async with self.sessions() as s:
                await locks.beat(s, name=locks.heartbeat_name("scheduler"),
                                 holder=self.holder, ttl=self.schedule.lease_ttl)
        except Exception as exc:  # the check turns unhealthy; the next tick tries again
            log.warning("scheduler heartbeat not written: %s", type(exc).__name__)

    def _start_jobs(self) -> None:
        _LIVE[self.key] = self
        grace = int(self.schedule.misfire_grace.total_seconds())
        # The job store is synchronous and runs in this event loop: on SQLite, waiting out a
        # lock held by one of this loop's own transactions (it cannot commit while the loop
        # waits) would freeze the loop for sqlite3's default 5 s, so give up after 0.5 s and
        # let RetryingAsyncIOScheduler try again.
        options = ({"connect_args": {"timeout": 0.5}}
                   if make_url(self._url).get_backend_name() == "sqlite" else {})
        aps = RetryingAsyncIOScheduler(
            jobstores={"default": ScheduleStateStore(url=self._url, engine_options=options)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": grace})
        kw = {"kwargs": {"key": self.key}, "replace_existing": True}
        aps.add_job(threshold_job, "interval", id="learn-threshold",
                    seconds=self.schedule.check_every.total_seconds(), **kw)
        aps.add_job(canary_job, "interval", id="learn-canary",
                    seconds=self.schedule.canary_every.total_seconds(), **kw)
        if self.schedule.cron:
            aps.add_job(cron_job, CronTrigger.from_crontab(self.schedule.cron), id="learn-cron",
                        **kw)
        if self.schedule.retention_days:
            aps.add_job(retention_job, CronTrigger.from_crontab(self.schedule.retention_cron),
                        id="learn-retention", **kw)
        aps.start()
        self._aps = aps
        log.info("leading the learning loop scheduler (%s)", self.key)

    def _stop_jobs(self) -> None:
        if self._aps is not None:
            self._aps.shutdown(wait=False)
            self._aps = None

    async def check(self) -> None:
        ok, why = await should_train(self.sessions, self.loop_cfg)
        log.info("threshold check: %s", why)
        if ok:
            await self.cycle("threshold")

    async def cycle(self, trigger: str) -> None:
        result = await run_cycle(self.sessions, self.backend, self.loop_cfg, trigger=trigger)
        self.results.append(result)
        log.info("cycle (%s): %s %s %s", trigger, result.status, result.adapter or "",
                 "; ".join(result.reasons))

    async def canary(self) -> None:
        outcome = await evaluate_canary(self.sessions, self.schedule.canary,
                                        rules=self.loop_cfg.dataset)
        self.results.append(outcome)
        await self.adapters.sync()

    async def retention(self) -> None:
        """Delete what is older than the retention period (the daily job)."""
        if self.schedule.retention_days is None:  # a job stored when it was set
            return
        report = await apply_retention(self.sessions, days=self.schedule.retention_days,
                                       runs_dir=self.loop_cfg.runs_dir)
        self.results.append(report)

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set: renew leadership every third of the lease TTL."""
        every = self.schedule.lease_ttl.total_seconds() / 3
        try:
            while not stop.is_set():
                await self.tick()
                try:
                    await asyncio.wait_for(stop.wait(), timeout=every)
                except TimeoutError:
                    pass
        finally:
            await self.close()

    async def close(self) -> None:
        self._stop_jobs()
        _LIVE.pop(self.key, None)
        await self.leadership.release()

