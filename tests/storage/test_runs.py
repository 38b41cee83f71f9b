"""Training runs on SQLite and PostgreSQL: the run lease, heartbeats, outcomes, lineage and
the feedback revisions a run consumed."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from storage import adapters, runs
from storage.models import AdapterStatus, RunFeedback, RunStatus, TrainingRun, utcnow

STALE = timedelta(minutes=5)


async def test_one_run_holds_the_lease_until_it_finishes(sessions) -> None:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        first = await runs.start_run(s, trigger="cron", stale_after=STALE)
        assert first is not None
        assert await runs.start_run(s, trigger="threshold", stale_after=STALE) is None
        await runs.finish_run(s, run_id=first, status=RunStatus.SKIPPED, error="no data")
        second = await runs.start_run(s, trigger="manual", stale_after=STALE)
        assert second is not None and second > first
        [newest, oldest] = await runs.recent_runs(s)
    assert (newest.id, newest.status, newest.trigger) == (second, "running", "manual")
    assert (oldest.status, oldest.error) == ("skipped", "no data")
    assert oldest.finished_at is not None and newest.finished_at is None


async def test_a_run_whose_process_died_is_taken_over_after_its_heartbeat_stops(
        sessions) -> None:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        s.add(TrainingRun(status=RunStatus.RUNNING, heartbeat_at=utcnow() - timedelta(hours=1)))
        await s.commit()
        assert await runs.start_run(s, trigger="manual", stale_after=timedelta(days=1)) is None
        assert await runs.start_run(s, trigger="manual", stale_after=STALE) is not None
        rows = await runs.recent_runs(s)
    assert [(r.status, r.error is not None) for r in reversed(rows)] == [
        ("failed", True), ("running", False)]


async def test_a_heartbeat_keeps_a_run_from_being_taken_over(sessions) -> None:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        s.add(TrainingRun(status=RunStatus.RUNNING, heartbeat_at=utcnow() - timedelta(hours=1)))
        await s.commit()
        [run] = await runs.recent_runs(s)
        await runs.heartbeat(s, run_id=run.id)
        assert await runs.start_run(s, trigger="manual", stale_after=STALE) is None


async def test_a_run_records_its_dataset_and_registers_its_adapter_with_its_outcome(
        sessions) -> None:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        run_id = await runs.start_run(s, trigger="manual", stale_after=STALE)
        await runs.record_dataset(s, run_id=run_id, dataset_hash="h" * 64,
                                  adapter_name="fb-v1", log_path="/runs/run-1/train.log")
        version = adapters.new_version(name="fb-v1", path="/adapters/fb-v1", rank=4,
                                       parent_name=None, run_id=run_id,
                                       dataset_hash="h" * 64, metrics={"ok": 1})
        await runs.finish_run(s, run_id=run_id, status=RunStatus.SUCCEEDED, metrics={"ok": 1},
                              register=version)
        [run] = await runs.recent_runs(s)
        registered = await adapters.get(s, "fb-v1")
    assert (run.status, run.dataset_hash, run.adapter_name) == ("succeeded", "h" * 64, "fb-v1")
    assert run.log_path == "/runs/run-1/train.log" and run.metrics == {"ok": 1}
    assert registered is not None and registered.run_id == run_id


async def test_a_run_records_what_it_consumed_and_the_last_start_is_aware(
        sessions) -> None:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        assert await runs.last_started(s) is None
        run_id = await runs.start_run(s, trigger="manual", stale_after=STALE)
        consumed = {i: (i % 3 + 1, "trained" if i % 2 else "heldout") for i in range(1, 2500)}
        await runs.record_consumed(s, run_id=run_id, consumed=consumed)
        await runs.record_consumed(s, run_id=run_id, consumed={})
        rows = (await s.execute(select(RunFeedback))).scalars().all()
        started = await runs.last_started(s)
    assert {r.feedback_id: (r.revision, r.role) for r in rows} == consumed
    assert {r.run_id for r in rows} == {run_id}
    assert started is not None and timedelta(0) <= utcnow() - started < timedelta(minutes=1)


async def test_an_adapters_lineage_is_the_runs_behind_it_and_its_ancestors(sessions) -> None:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        ids = []
        for n, parent in ((1, None), (2, "fb-v1"), (3, "fb-v1"), (4, "fb-v3")):
            run_id = await runs.start_run(s, trigger="manual", stale_after=STALE)
            ids.append(run_id)
            version = adapters.new_version(
                name=f"fb-v{n}", path=f"/a/{n}", rank=4, parent_name=parent, run_id=run_id,
                dataset_hash="h", metrics={}, status=AdapterStatus.RETIRED)
            await runs.finish_run(s, run_id=run_id, status=RunStatus.SUCCEEDED, register=version)
        s.add(adapters.new_version(name="imported", path="/a/i", rank=4, parent_name="fb-v2",
                                   run_id=None, dataset_hash="h", metrics={}))
        await s.commit()
        assert await runs.lineage(s, adapter="fb-v4") == [ids[3], ids[2], ids[0]]
        assert await runs.lineage(s, adapter="imported") == [ids[1], ids[0]]
        assert await runs.lineage(s, adapter=None) == []
        assert await runs.lineage(s, adapter="fb-v404") == []
