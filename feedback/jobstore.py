"""APScheduler's SQLAlchemy job store without pickles: jobs are defined in code, only their
schedule state (the next run time) is kept in the database.

APScheduler 3's `SQLAlchemyJobStore` stores each job as a pickle and unpickles every row it
reads, so anyone able to write the `apscheduler_jobs` table could run code in the trainer.
This store keeps the same table (id, next_run_time, job_state) but writes `job_state` as a
short JSON description for people and never reads it: a row only lends its next run time to
the job of the same id that this process defined in code (`add_job`). Rows of ids not defined
here, a release's retired jobs or anything planted, are deleted unread.
"""

from __future__ import annotations

import json
from typing import Any

from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.util import datetime_to_utc_timestamp, utc_timestamp_to_datetime
from sqlalchemy import and_, select
from sqlalchemy.exc import IntegrityError


class ScheduleStateStore(SQLAlchemyJobStore):
    """Job definitions in this process's memory (from code), next run times in the database."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._defined: dict[str, dict[str, Any]] = {}  # job id -> the job as code made it

    def add_job(self, job: Job) -> None:
        self._defined[job.id] = job.__getstate__()
        insert = self.jobs_t.insert().values(id=job.id, **self._row(job))
        with self.engine.begin() as connection:
            try:
                connection.execute(insert)
            except IntegrityError:
                raise ConflictingIdError(job.id) from None

    def update_job(self, job: Job) -> None:
        self._defined[job.id] = job.__getstate__()
        update = self.jobs_t.update().values(**self._row(job)).where(self.jobs_t.c.id == job.id)
        with self.engine.begin() as connection:
            if connection.execute(update).rowcount == 0:
                raise JobLookupError(job.id)

    def remove_job(self, job_id: str) -> None:
        super().remove_job(job_id)
        self._defined.pop(job_id, None)

    def remove_all_jobs(self) -> None:
        super().remove_all_jobs()
        self._defined.clear()

    def lookup_job(self, job_id: str) -> Job | None:
        jobs = self._get_jobs(self.jobs_t.c.id == job_id)
        return jobs[0] if jobs else None

    def _get_jobs(self, *conditions: Any) -> list[Job]:
        t = self.jobs_t
        stmt = select(t.c.id, t.c.next_run_time).order_by(t.c.next_run_time)
        stmt = stmt.where(and_(*conditions)) if conditions else stmt
        jobs, unknown = [], []
        with self.engine.begin() as connection:
            for row in connection.execute(stmt):
                if row.id in self._defined:
                    jobs.append(self._job(row.id, row.next_run_time))
                else:
                    unknown.append(row.id)
            if unknown:
                self._logger.warning("removing scheduled jobs no code defines: %s", unknown)
                connection.execute(t.delete().where(t.c.id.in_(unknown)))
        return jobs

    def _job(self, job_id: str, next_run_time: float | None) -> Job:
        state = dict(self._defined[job_id], jobstore=self,
                     next_run_time=utc_timestamp_to_datetime(next_run_time))
        job = Job.__new__(Job)
        job.__setstate__(state)
        job._scheduler = self._scheduler
        job._jobstore_alias = self._alias
        return job

    @staticmethod
    def _row(job: Job) -> dict[str, Any]:
        about = {"func": job.func_ref, "trigger": str(job.trigger)}  # for people; never read
        return {"next_run_time": datetime_to_utc_timestamp(job.next_run_time),
                "job_state": json.dumps(about).encode()}
