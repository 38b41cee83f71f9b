"""One learning-loop cycle with a stand-in trainer: registration, gate, parity, run lease, kills."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from feedback.loop import run_cycle, should_train
from storage import adapters
from storage.models import AdapterVersion, RunFeedback, TrainingRun
from tests.fakes.inference import ScriptedBackend
from tests.feedback.conftest import REVIEWER, Asker, eventually, loop_config, make_core


async def corrected(sessions, tokenizer, n: int = 4) -> None:  # type: ignore[no-untyped-def]
    core = make_core(sessions, tokenizer)
    users = Asker(core)
    for i in range(n):
        answer = await users.ask(f"How long does delivery take to zone {i}?")
        await core.correct(answer_id=answer, voter_id=REVIEWER, text=f"{i + 2} days.",
                           source="test")


async def runs(sessions) -> list[TrainingRun]:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        return list((await s.execute(select(TrainingRun).order_by(TrainingRun.id))).scalars())


async def versions(sessions) -> list[AdapterVersion]:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        return await adapters.all_versions(s)


async def test_a_passing_candidate_is_registered_as_the_canary_and_served(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    await corrected(sessions, tokenizer)
    backend = ScriptedBackend()
    result = await run_cycle(sessions, backend, loop_config(tmp_path, model_dir, fake="pass 0"),
                             trigger="manual")
    assert (result.status, result.adapter) == ("succeeded", "fb-v1")
    [version] = await versions(sessions)
    assert (version.status, version.rank, version.path) == (
        "canary", 4, str(tmp_path / "adapters/fb-v1"))
    assert backend.adapters == {"fb-v1"}  # hot-loaded, parity-checked
    [run] = await runs(sessions)
    assert run.status == "succeeded" and run.dataset_hash == version.dataset_hash
    counts = {k: run.metrics["dataset"][k] for k in ("corrections_trained",
                                                     "corrections_heldout")}
    async with sessions() as s:  # what the run consumed: each correction, in its role
        roles = [r.role for r in (await s.execute(select(RunFeedback))).scalars()]
    assert sum(counts.values()) == len(roles) == 4
    assert counts == {"corrections_trained": roles.count("trained"),
                      "corrections_heldout": roles.count("heldout")}
    assert run.metrics["parity"]["score"] == 1.0 and run.log_path.endswith("train.log")


async def test_the_training_worker_can_run_under_accelerate_launch(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    """As on a GPU host (CHATLOOP_LEARN_TRAIN_COMMAND); here on the CPU, one process."""
    await corrected(sessions, tokenizer)
    cfg = loop_config(tmp_path, model_dir)
    cfg.train_command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu",
                         "--num_processes", "1", "--num_machines", "1", "--mixed_precision",
                         "no", "--dynamo_backend", "no", "-m", "tests.feedback.fake_trainer",
                         "pass", "0"]
    result = await run_cycle(sessions, ScriptedBackend(), cfg, trigger="manual")
    assert (result.status, result.adapter) == ("succeeded", "fb-v1"), result.reasons


async def test_a_candidate_failing_the_gate_is_not_registered(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    await corrected(sessions, tokenizer)
    backend = ScriptedBackend()
    cfg = loop_config(tmp_path, model_dir, fake="regress 0")
    result = await run_cycle(sessions, backend, cfg, trigger="manual")
    assert result.status == "rejected" and "golden-set loss rose" in result.reasons[0]
    assert await versions(sessions) == [] and backend.adapters == set()
    assert not (tmp_path / "adapters/fb-v1").exists()
    assert (tmp_path / "runs/run-1/rejected-adapter/report.json").exists()
    [run] = await runs(sessions)
    assert run.status == "rejected" and "golden" in run.error


async def test_a_backend_that_serves_different_text_fails_parity(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    await corrected(sessions, tokenizer)
    backend = ScriptedBackend(answer=lambda r: "something else entirely")
    result = await run_cycle(sessions, backend, loop_config(tmp_path, model_dir, fake="pass 0"),
                             trigger="manual")
    assert result.status == "rejected" and "parity" in result.reasons[0]
    assert await versions(sessions) == [] and backend.adapters == set()


async def test_a_second_trigger_while_a_run_is_active_does_nothing(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    await corrected(sessions, tokenizer)
    cfg = loop_config(tmp_path, model_dir, fake="pass 2")
    first = asyncio.create_task(run_cycle(sessions, ScriptedBackend(), cfg, trigger="cron"))
    await eventually(lambda: runs(sessions))
    second = await run_cycle(sessions, ScriptedBackend(), cfg, trigger="threshold")
    assert second.status == "busy" and (await first).status == "succeeded"
    assert [r.trigger for r in await runs(sessions)] == ["cron"]


def _children() -> list[int]:
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


async def test_a_killed_training_process_leaves_nothing_and_the_next_run_succeeds(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    await corrected(sessions, tokenizer)
    backend = ScriptedBackend()
    before = set(_children())
    cycle = asyncio.create_task(run_cycle(
        sessions, backend, loop_config(tmp_path, model_dir, fake="pass 60"), trigger="manual"))
    async def started() -> set[int]:
        return set(_children()) - before

    trainer = await eventually(started)
    await asyncio.sleep(0.5)
    os.kill(trainer.pop(), signal.SIGKILL)
    result = await cycle
    assert result.status == "failed" and "exited with -9" in result.reasons[0]
    assert await versions(sessions) == [] and backend.adapters == set()
    assert list((tmp_path / "adapters").iterdir()) == []
    retry = await run_cycle(sessions, backend, loop_config(tmp_path, model_dir, fake="pass 0"),
                            trigger="manual")
    assert (retry.status, retry.adapter) == ("succeeded", "fb-v2")
    assert [r.status for r in await runs(sessions)] == ["failed", "succeeded"]


async def test_threshold_interval_and_canary_gate_new_runs(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    cfg = loop_config(tmp_path, model_dir, fake="pass 0", min_new_feedback=3,
                      min_interval=timedelta(hours=1))
    await corrected(sessions, tokenizer, n=2)
    assert (await should_train(sessions, cfg))[0] is False
    await corrected(sessions, tokenizer, n=1)
    assert await should_train(sessions, cfg) == (True, "3 new eligible feedback")
    await run_cycle(sessions, ScriptedBackend(), cfg, trigger="threshold")
    await corrected(sessions, tokenizer, n=3)
    ok, why = await should_train(sessions, cfg)
    assert not ok and "canary fb-v1" in why
    async with sessions() as s:
        await adapters.promote(s, name="fb-v1")
    ok, why = await should_train(sessions, cfg)
    assert not ok and "minimum" in why
    cfg.min_interval = timedelta(0)
    assert await should_train(sessions, cfg) == (True, "3 new eligible feedback")


async def test_the_next_run_continues_from_the_active_adapter_with_new_data_and_replay(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    import json

    cfg = loop_config(tmp_path, model_dir, fake="pass 0")
    await corrected(sessions, tokenizer, n=4)
    assert (await run_cycle(sessions, ScriptedBackend(), cfg, trigger="manual")).status == (
        "succeeded")
    async with sessions() as s:
        await adapters.promote(s, name="fb-v1")
    core = make_core(sessions, tokenizer)
    for question in ("Do you sell gift cards?", "Can I buy a gift voucher?"):  # one held out
        answer = await Asker(core).ask(question)
        await core.correct(answer_id=answer, voter_id=REVIEWER, text="Yes, 10 to 500 pounds.",
                           source="test")
    second = await run_cycle(sessions, ScriptedBackend(), cfg, trigger="manual")
    assert (second.status, second.adapter) == ("succeeded", "fb-v2")
    work = tmp_path / "runs/run-2"
    job = json.loads((work / "job.json").read_text())
    assert job["parent_path"] == str(tmp_path / "adapters/fb-v1")
    rows = [json.loads(line) for line in (work / "sft.jsonl").read_text().splitlines()]
    first_run = (tmp_path / "runs/run-1/sft.jsonl").read_text().splitlines()
    new = [r for r in rows if r["source"] == "correction"]
    replay = [r for r in rows if r["source"] == "replay"]
    held = [json.loads(line) for line in
            (tmp_path / "runs/run-2/heldout.jsonl").read_text().splitlines()]
    # run 1 trained on its four corrections (four answers, judged on rephrasings); run 2 on
    # one gift-card question, the other held out; nothing run 1 trained on
    assert [r["completion"] for r in new] == ["Yes, 10 to 500 pounds."]
    assert [(r["source"], r["completion"]) for r in held] == [
        ("correction", "Yes, 10 to 500 pounds.")]
    assert len(replay) == 1 and len(first_run) == 4  # half of one new example, rounded up
    async with sessions() as s:
        assert (await adapters.get(s, "fb-v2")).parent_name == "fb-v1"


async def test_the_training_process_sees_the_answer_memory_as_it_stands(
        sessions, tokenizer, tmp_path, model_dir) -> None:  # type: ignore[no-untyped-def]
    """The gate's with-memory figures use the live entries (imported ones too, disabled ones
    not); the file is gone once the training process has read it."""
    from storage import memory
    from storage.models import MemoryStatus

    await corrected(sessions, tokenizer)  # a reviewer's corrections: four entries at once
    async with sessions() as s:
        imported, off = await memory.add_entries(s, [
            memory.NewEntry("Do you sell gift cards?", "Yes, from 10 to 200 pounds."),
            memory.NewEntry("Old question", "An answer no longer given.")], actor="admin")
        assert await memory.set_status(s, entry_id=off, status=MemoryStatus.DISABLED, by="admin")
        await s.commit()
    cfg = loop_config(tmp_path, model_dir, fake="pass 0")
    result = await run_cycle(sessions, ScriptedBackend(), cfg, trigger="manual")
    assert result.status == "succeeded"
    assert result.metrics is not None and result.metrics["memory_entries"] == 5
    assert not list(cfg.runs_dir.glob("run-*/memory.jsonl"))
