"""Forgetting a person while the core serves others: their rows, payload copies, dataset lines
and exports are gone, the adapter trained on them is tainted, and the next run excludes them
and starts from the base model. Retention, and the run's guard (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from feedback import erasure
from feedback.canary import CanaryPolicy, Decision, evaluate_canary
from feedback.dataset import build_dataset
from feedback.loop import LoopConfig, run_cycle, should_train
from feedback.scheduler import LearningScheduler, ScheduleConfig
from inference.registry import AdapterRegistry
from storage import adapters, audit, forget, privacy
from storage.models import AdapterVersion, Message, RunIdentity, TrainingRun, utcnow
from tests.fakes.inference import ScriptedBackend
from tests.feedback.conftest import REVIEWER, Asker, eventually, loop_config, make_core
from tests.storage.test_forget import dump

SECRET = "quokkaberry"  # in everything the forgotten person wrote, and nowhere else


async def people(sessions, tokenizer):  # type: ignore[no-untyped-def]
    """Alice (three questions, corrected by the reviewer, and a vote on Bob's answer) and Bob
    (four corrected questions); returns the core, an asker, and Alice's identity as stored."""
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    bob = []
    for i in range(4):
        answer = await users.ask(f"When does parcel {i} arrive?", user="test:bob")
        await core.correct(answer_id=answer, voter_id=REVIEWER, text=f"In {i + 2} days.",
                           source="test")
        bob.append(answer)
    for i in range(3):
        answer = await users.ask(f"My {SECRET} order {i} is late", user="test:alice")
        await core.correct(answer_id=answer, voter_id=REVIEWER,
                           text=f"Your {SECRET} order {i} ships today.", source="test")
    async with sessions() as s:  # as stored, whichever form identities take
        alice = (await s.execute(select(Message.author_id)
                                 .where(Message.text.contains(SECRET)))).scalars().first()
    await core.vote(answer_id=bob[0], voter_id=alice, rating=1, source="test")
    return core, users, alice


def traces(root: Path, *extra: Path) -> list[str]:
    """The files under `root` (and `extra`) holding the secret."""
    files = [p for p in root.rglob("*") if p.is_file()] + [p for p in extra if p.exists()]
    return [str(p) for p in files if SECRET.encode() in p.read_bytes()]


def pg_dump(db_url: str) -> str:
    """The database as `pg_dump` writes it (PostgreSQL), else ""."""
    url = make_url(db_url)
    if not url.get_backend_name().startswith("postgres") or not shutil.which("pg_dump"):
        return ""
    return subprocess.run(["pg_dump", "--data-only", "-h", url.host or "127.0.0.1",
                           "-p", str(url.port or 5432), "-U", url.username or "postgres",
                           url.database or ""], capture_output=True, text=True, check=True,
                          timeout=60).stdout


async def hashes_of_run(sessions, run_id: int) -> set[str]:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        stmt = select(RunIdentity.identity_hash).where(RunIdentity.run_id == run_id)
        return set((await s.execute(stmt)).scalars())


async def export(sessions, cfg: LoopConfig, out: Path) -> None:  # type: ignore[no-untyped-def]
    async def build(s):  # type: ignore[no-untyped-def]
        return await build_dataset(s, policy=cfg.dataset, redactor=cfg.redactor)

    await erasure.export(sessions, runs_dir=cfg.runs_dir, out=out, build=build)


async def test_forget_while_serving_removes_every_trace_and_the_next_run_starts_from_the_base(
        db_url, sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    core, users, alice = await people(sessions, tokenizer)
    cfg = loop_config(tmp_path, model_dir, fake="pass 0", min_interval=timedelta(0))
    first = await run_cycle(sessions, ScriptedBackend(), cfg, trigger="manual")
    assert (first.status, first.adapter) == ("succeeded", "fb-v1"), first.reasons
    async with sessions() as s:
        await adapters.promote(s, name="fb-v1")  # a later run would continue from it
        alice_hash = (await privacy.hashes(s, [alice]))[alice]
        for model in (TrainingRun, AdapterVersion):  # the real trainer's sample answers
            metrics = (await s.execute(select(model.metrics))).scalar_one()
            metrics["candidate"]["heldout_answers"] = [f"About your {SECRET} order: soon."]
            await s.execute(update(model).values(metrics=metrics))
        await s.commit()
    adapter_report = cfg.adapters_dir / "fb-v1" / "report.json"
    adapter_report.write_text(json.dumps(metrics))
    assert alice_hash in await hashes_of_run(sessions, first.run_id)
    outside = tmp_path / "exports" / "dataset.jsonl"
    await export(sessions, cfg, outside)
    assert traces(cfg.runs_dir, outside) and SECRET in await dump(sessions)  # it was there

    served: list[int] = []
    stop = asyncio.Event()

    async def serve_others() -> None:
        while not stop.is_set():
            served.append(await users.ask("Do you deliver on Sundays?", user="test:carol"))

    serving = asyncio.create_task(serve_others())
    await eventually(lambda: asyncio.sleep(0, len(served) >= 2))
    report = await erasure.forget_person(sessions, identity=alice, runs_dir=cfg.runs_dir,
                                         adapters_dir=cfg.adapters_dir, actor="cli:tester")
    answered = len(served)
    await eventually(lambda: asyncio.sleep(0, len(served) >= answered + 2))  # still serving
    stop.set()
    await serving

    assert report.erased.counts["messages"] == 6 and report.rows > 0
    assert report.tainted_runs == [first.run_id] and report.tainted_adapters == ["fb-v1"]
    assert traces(cfg.runs_dir, outside, adapter_report) == []
    assert json.loads(adapter_report.read_text())["candidate"]["heldout_f1"] == 0.8  # the rest
    dumped = pg_dump(db_url)
    assert "COPY public.message" in dumped or not db_url.startswith("postgres")
    everything = await dump(sessions) + dumped
    assert SECRET not in everything and alice not in everything
    assert "Do you deliver on Sundays?" in everything  # the others' data stays
    async with sessions() as s:
        [fb1] = await adapters.all_versions(s)
        [entry] = await audit.recent(s, action="forget")
    assert fb1.tainted_at is not None and fb1.status == "active"
    assert (entry.actor, entry.target) == ("cli:tester", f"identity:{alice_hash[:16]}")

    assert await should_train(sessions, cfg) == (
        True, "fb-v1 was trained on data since forgotten")
    second = await run_cycle(sessions, ScriptedBackend(), cfg, trigger="threshold")
    assert second.status == "succeeded", second.reasons
    job = json.loads((cfg.runs_dir / f"run-{second.run_id}" / "job.json").read_text())
    assert job["parent_path"] is None  # from the base model, not the tainted adapter
    assert traces(cfg.runs_dir) == []
    run_people = await hashes_of_run(sessions, second.run_id)
    assert alice_hash not in run_people and run_people  # Bob's, the reviewer's


async def test_forgetting_during_a_run_taints_its_adapter_which_is_never_promoted(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    _, _, alice = await people(sessions, tokenizer)
    cfg = loop_config(tmp_path, model_dir, fake="pass 2", min_interval=timedelta(0))
    cycle = asyncio.create_task(run_cycle(sessions, ScriptedBackend(), cfg, trigger="cron"))

    async def training() -> bool:  # the dataset is recorded: the trainer is at work
        async with sessions() as s:
            run = (await s.execute(select(TrainingRun))).scalars().first()
        return run is not None and run.log_path is not None

    await eventually(training)
    report = await erasure.forget_person(sessions, identity=alice, runs_dir=cfg.runs_dir,
                                         adapters_dir=cfg.adapters_dir, actor="cli:tester")
    assert report.tainted_runs == [1] and report.tainted_adapters == []  # not registered yet
    result = await cycle
    assert (result.status, result.adapter) == ("succeeded", "fb-v1")  # the run finishes
    async with sessions() as s:
        [fb1] = await adapters.all_versions(s)
    assert fb1.status == "canary" and fb1.tainted_at is not None  # tainted as it registered

    outcome = await evaluate_canary(sessions, CanaryPolicy(), rules=cfg.dataset)
    assert outcome.decision == Decision.ROLLBACK  # no votes needed: never promoted
    async with sessions() as s:
        [entry] = await audit.recent(s, action="rollback")
    assert (entry.actor, entry.target, entry.detail["tainted"]) == (
        "system:canary", "adapter:fb-v1", True)
    assert await should_train(sessions, cfg) == (
        True, "fb-v1 was trained on data since forgotten")  # and so it is retrained
    again = await run_cycle(sessions, ScriptedBackend(), replace(cfg, train_command=[
        *cfg.train_command[:-2], "pass", "0"]), trigger="threshold")
    assert again.status == "succeeded" and traces(cfg.runs_dir) == []
    async with sessions() as s:
        alice_hash = (await privacy.hashes(s, [alice]))[alice]
    assert alice_hash not in await hashes_of_run(sessions, again.run_id)


async def test_a_run_whose_data_is_deleted_while_it_builds_starts_again(
        sessions, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mark = await erasure.erasure_mark(sessions)
    work = tmp_path / "run-1"
    work.mkdir()
    (work / "sft.jsonl").write_text('{"conversation_id": 1}\n')
    async with sessions() as s:
        await forget.forget_identity(s, identity="test:someone", actor="cli:tester")
        run = TrainingRun()
        s.add(run)
        await s.commit()
    try:
        await erasure.record_run_data(sessions, run_id=run.id, examples=[], mark=mark,
                                      work=work)
    except erasure.ErasedMeanwhile:
        pass
    else:
        raise AssertionError("the run went on with data deleted under it")
    assert list(work.glob("*.jsonl")) == []
    await erasure.record_run_data(sessions, run_id=run.id, examples=[], mark=mark + 1,
                                  work=work)  # nothing deleted since: it goes on


async def test_datasets_and_exports_leave_out_a_forgotten_person_who_writes_again(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    core, users, alice = await people(sessions, tokenizer)
    cfg = loop_config(tmp_path, model_dir)
    await erasure.forget_person(sessions, identity=alice, runs_dir=cfg.runs_dir,
                                adapters_dir=cfg.adapters_dir, actor="cli:t")
    channel, _, user = alice.partition(":")
    again = await users.ask(f"Me again about {SECRET}", user=alice if channel else f"test:{user}")
    await core.correct(answer_id=again, voter_id=REVIEWER, text=f"Sure, {SECRET}.",
                       source="test")
    out = tmp_path / "export.jsonl"
    await export(sessions, cfg, out)
    rows = out.read_text()
    assert SECRET not in rows and "parcel" in rows  # Bob's data is in it
    assert (cfg.runs_dir / erasure.EXPORTS).read_text().split() == [str(out.resolve())]


async def test_retention_removes_old_conversations_from_storage_and_dataset_files(
        db_url, sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    await people(sessions, tokenizer)
    cfg = loop_config(tmp_path, model_dir)
    out = tmp_path / "export.jsonl"
    await export(sessions, cfg, out)
    assert SECRET in out.read_text()
    async with sessions() as s:  # Alice's conversations are 40 days old
        when = utcnow() - timedelta(days=40)
        await s.execute(update(Message).where(Message.conversation_id.in_(
            select(Message.conversation_id).where(Message.text.contains(SECRET))))
            .values(created_at=when))
        await s.commit()
    schedule = ScheduleConfig(check_every=timedelta(hours=1), canary_every=timedelta(hours=1),
                              cron=None, retention_days=30)
    backend = ScriptedBackend()
    sched = LearningScheduler(engine=sessions.kw["bind"], sessions=sessions, backend=backend,
                              adapters=AdapterRegistry(backend, source=_nothing), loop=cfg,
                              schedule=schedule, database_url=db_url, key=f"r{id(sessions)}")
    try:
        assert await sched.tick()
        assert sched._aps is not None and sched._aps.get_job("learn-retention") is not None
        await sched.retention()  # what the daily job runs
    finally:
        await sched.close()
    [report] = sched.results
    assert report.erased.counts["messages"] == 6 and report.rows > 0
    rows = out.read_text()
    assert SECRET not in rows and "parcel" in rows
    async with sessions() as s:
        [entry] = await audit.recent(s)
        left = (await s.execute(select(Message.text))).scalars().all()
    assert (entry.actor, entry.action) == ("system:retention", "retention")
    assert len(left) == 8 and not any(SECRET in t for t in left)


async def _nothing():  # type: ignore[no-untyped-def]
    from inference.registry import ServingState

    return ServingState(active=None, canary=None, retired=())


async def test_a_deletion_refused_for_a_message_that_arrived_meanwhile_is_tried_again(
        sessions) -> None:  # type: ignore[no-untyped-def]
    tries: list[int] = []

    async def erase(s):  # type: ignore[no-untyped-def]
        tries.append(1)
        if len(tries) == 1:  # what deleting a conversation that just got a message raises
            raise IntegrityError("DELETE FROM conversation ...", {}, Exception("foreign key"))
        return forget.Erased(counts={"messages": 2})

    assert (await erasure._retrying(sessions, erase)).counts == {"messages": 2}
    assert len(tries) == 2


async def test_forget_writes_no_report_outside_the_adapters_directory(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    """An adapter path in the database is not trusted: one pointing elsewhere is left alone."""
    _, _, alice = await people(sessions, tokenizer)
    cfg = loop_config(tmp_path, model_dir, fake="pass 0")
    first = await run_cycle(sessions, ScriptedBackend(), cfg, trigger="manual")
    assert first.status == "succeeded", first.reasons
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    report = {"candidate": {"heldout_answers": [f"About your {SECRET} order"]}}
    (elsewhere / "report.json").write_text(json.dumps(report))
    async with sessions() as s:
        await s.execute(update(AdapterVersion).values(path=f"{cfg.adapters_dir}/../elsewhere"))
        await s.commit()
    done = await erasure.forget_person(sessions, identity=alice, runs_dir=cfg.runs_dir,
                                       adapters_dir=cfg.adapters_dir, actor="cli:t")
    assert done.tainted_adapters == ["fb-v1"]
    assert json.loads((elsewhere / "report.json").read_text()) == report
