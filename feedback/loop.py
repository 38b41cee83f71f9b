"""One cycle of the learning loop: dataset -> training process -> gate -> parity -> canary.

A candidate the gate passes has been trained again on every correction, its held-out ones
too, by the same training process (settling, feedback.train._settle): the run records them
as trained.

The scheduler and `chatloop train --now` both call `run_cycle`. A cycle holds
the run lease (the one `running` training-run row the database allows) and
heartbeats it; training runs in a child process; only a candidate that passes
the gate and the parity check is registered, in the same transaction that
closes the run, so a crash at any point leaves the registry and serving as
they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatloop.telemetry import hooks
from feedback import erasure
from feedback.dataset import (
    Dataset,
    DatasetPolicy,
    Example,
    build_dataset,
    read_examples,
    write_jsonl,
)
from feedback.evaluate import GatePolicy, gate, parity
from feedback.examples import augment_questions, rephrasings
from feedback.job import TrainJob
from feedback.redaction import Redactor
from inference.adapters import adapter_rank, check_prefix, inside
from inference.base import ChatMessage, GenerationRequest, InferenceBackend, TextDelta
from inference.batching import training_env
from inference.errors import InferenceError
from storage import adapters, privacy, runs
from storage import memory as answer_memory
from storage.db import unavailable
from storage.feedback import eligible_count, release_heldout
from storage.models import AdapterVersion, MemoryStatus, RunStatus, utcnow

log = logging.getLogger(__name__)

DEFAULT_PARITY_PROMPTS = ["What are your opening hours?", "How do I return an item?"]


@dataclass
class LoopConfig:
    """Everything a cycle needs; built by the composition root from the settings."""

    model_dir: str
    adapters_dir: Path
    runs_dir: Path
    adapter_prefix: str = "fb"
    dataset: DatasetPolicy = field(default_factory=DatasetPolicy)
    gate: GatePolicy = field(default_factory=GatePolicy)
    redactor: Redactor = field(default_factory=Redactor)
    train: TrainJob | None = None  # hyper-parameters template (paths are filled per run)
    min_new_feedback: int = 50
    min_interval: timedelta = timedelta(hours=1)
    incremental: bool = True  # continue from the active adapter
    # once the candidate passes the gate, train the recipe again on every correction, the
    # held-out ones too, and ship that (feedback.train._settle); False: the held-out ones wait
    # for the next run with new held-out data. On the answer-memory benchmark's unseen
    # phrasings it raised token-F1 by 0.07-0.08 in two of three runs and left it as it was in
    # the third (docs/benchmarks.md#answer-memory)
    settle: bool = True
    heartbeat_s: float = 15.0
    stale_after: timedelta = timedelta(minutes=5)
    parity_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PARITY_PROMPTS))
    train_command: list[str] = field(default_factory=lambda: [sys.executable, "-m",
                                                              "feedback.train"])

    def __post_init__(self) -> None:
        check_prefix(self.adapter_prefix)  # adapter names are directories: no `/`, no `..`


@dataclass(frozen=True)
class CycleResult:
    run_id: int | None
    status: str  # a RunStatus, or "busy" when another run holds the lease
    adapter: str | None = None
    reasons: tuple[str, ...] = ()
    metrics: dict[str, Any] | None = None


class TrainingFailed(RuntimeError):
    """The training process exited without writing an adapter."""


async def should_train(sessions: async_sessionmaker[AsyncSession], cfg: LoopConfig
                       ) -> tuple[bool, str]:
    """The threshold job's test: enough new eligible feedback, spaced by the minimum interval."""
    async with sessions() as s:
        new = await eligible_count(s)
        last = await runs.last_started(s)
        state = await adapters.serving(s)
        retrain = await privacy.retrain_due(s)
    if state.canary is not None:
        return False, f"canary {state.canary.name} is still being evaluated"
    if retrain is not None and (last is None or utcnow() - last >= cfg.min_interval):
        return True, retrain  # forgotten data: a run without it (from the base if need be)
    if new < cfg.min_new_feedback:
        return False, f"{new} new eligible feedback (threshold {cfg.min_new_feedback})"
    if last is not None and utcnow() - last < cfg.min_interval:
        return False, f"last run started {utcnow() - last} ago (minimum {cfg.min_interval})"
    return True, f"{new} new eligible feedback"


# how long finishing a run waits for a database that is away (then the run stays `running`
# and the next run fails it as stale)
FINISH_RETRY_S = 120.0


async def _finish(sessions: async_sessionmaker[AsyncSession], run_id: int, status: RunStatus,
                  **outcome: Any) -> None:
    """Finish the run (only if still running: runs.RunLost otherwise), retrying while the
    database is away."""
    deadline = asyncio.get_running_loop().time() + FINISH_RETRY_S
    delay = 0.5
    while True:
        try:
            async with sessions() as s:
                await runs.finish_run(s, run_id=run_id, status=status, **outcome)
            return
        except Exception as exc:
            if not unavailable(exc) or asyncio.get_running_loop().time() + delay > deadline:
                raise
            log.warning("finishing run %s: database unavailable (%s), retrying", run_id,
                        type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _heartbeat(sessions: async_sessionmaker[AsyncSession], run_id: int,
                     every: float) -> None:
    """Heartbeat the run every `every` seconds; a failed beat (the database is away) is
    logged and the next one tried, so an outage shorter than `stale_after` costs nothing."""
    while True:
        await asyncio.sleep(every)
        try:
            async with sessions() as s:
                await runs.heartbeat(s, run_id=run_id)
        except Exception as exc:
            if not unavailable(exc):
                raise
            log.warning("heartbeat of run %s failed (%s): retrying", run_id,
                        type(exc).__name__)


@hooks.training_run
async def run_cycle(sessions: async_sessionmaker[AsyncSession], backend: InferenceBackend,
                    cfg: LoopConfig, *, trigger: str) -> CycleResult:
    """Run one cycle (see the module docstring); never raises for a failed run."""
    async with sessions() as s:
        run_id = await runs.start_run(s, trigger=trigger, stale_after=cfg.stale_after)
    if run_id is None:
        log.info("a training run is already active: %s trigger ignored", trigger)
        return CycleResult(None, "busy")
    beat = asyncio.create_task(_heartbeat(sessions, run_id, cfg.heartbeat_s))
    try:
        return await _cycle(sessions, backend, cfg, run_id)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.exception("training run %s failed", run_id)
        await asyncio.shield(_abandon(sessions, backend, cfg, run_id, error))
        if not isinstance(exc, Exception):
            raise
        return CycleResult(run_id, RunStatus.FAILED, reasons=(error,))
    finally:
        beat.cancel()
        _cleanup_partial(cfg.adapters_dir)


async def _cycle(sessions: async_sessionmaker[AsyncSession], backend: InferenceBackend,
                 cfg: LoopConfig, run_id: int) -> CycleResult:
    async with sessions() as s:
        state = await adapters.serving(s)
        done = await runs.recent_runs(s, limit=1000)
    if state.canary is not None:
        why = f"canary {state.canary.name} is still being evaluated"
        await _finish(sessions, run_id, RunStatus.SKIPPED, error=why)
        return CycleResult(run_id, RunStatus.SKIPPED, reasons=(why,))
    # never continue from an adapter trained on forgotten data: start from the base without it
    parent = state.active if cfg.incremental and not _tainted(state.active) else None
    mark = await erasure.erasure_mark(sessions)  # before reading any data
    pool = [e for r in done if r.status == RunStatus.SUCCEEDED
            for e in _trained(cfg.runs_dir / f"run-{r.id}", r.metrics or {})]
    async with sessions() as s:  # what the parent's runs have not learned yet
        learned = await runs.lineage(s, adapter=parent.name if parent else None)
        ds = await build_dataset(s, policy=cfg.dataset, redactor=cfg.redactor,
                                 learned_by=learned, replay_pool=pool)
        await runs.record_consumed(s, run_id=run_id, consumed=ds.consumed)
    template = cfg.train or TrainJob(model_dir=cfg.model_dir, out_dir="", work_dir="")
    if len(ds.heldout) < cfg.gate.min_heldout and cfg.gate.rephrasings:
        _gate_on_rephrasings(ds, template)
    why = None
    if not ds.sft and len(ds.kto) < template.kto_min_examples:
        why = "no training data in the new feedback"
    elif len(ds.heldout) < cfg.gate.min_heldout and not _gate_on_votes(ds, cfg.gate):
        why = (f"{len(ds.heldout)} held-out corrections in the new feedback (the gate needs "
               f"{cfg.gate.min_heldout}, or {cfg.gate.min_heldout_votes} held-out votes "
               f"liked and disliked; {len(ds.heldout_votes)})")
    if why is not None:
        await _finish(sessions, run_id, RunStatus.SKIPPED, error=why, dataset_hash=ds.hash,
                      metrics={"dataset": ds.report})
        return CycleResult(run_id, RunStatus.SKIPPED, reasons=(why,))
    name = adapters.adapter_name(cfg.adapter_prefix, run_id)
    work = cfg.runs_dir / f"run-{run_id}"
    # the parent's path comes from the database: it must lie in the adapters directory
    parent_path = str(inside(parent.path, cfg.adapters_dir)) if parent else None
    job = _write_job(ds, template, cfg, work, name, parent_path)
    await erasure.record_run_data(sessions, run_id=run_id, examples=[*ds.sft, *ds.kto,
                                                                     *ds.heldout],
                                  mark=mark, work=work)  # whose data; none deleted meanwhile
    log_path = work / "train.log"
    async with sessions() as s:
        await runs.record_dataset(s, run_id=run_id, dataset_hash=ds.hash, adapter_name=name,
                                  log_path=str(log_path))
    memory_file = await _write_memory(sessions, cfg.redactor, work)
    try:
        report = await _train(cfg, job, log_path)
    finally:  # only the candidate's evaluation reads it; `forget` need not look for it
        memory_file.unlink(missing_ok=True)
    report["dataset"] = ds.report
    reasons = gate(report, cfg.gate)
    if not reasons:
        reasons = await _parity(backend, name, job, report, cfg.gate.parity_min)
    if reasons:
        shutil.move(job.out_dir, work / "rejected-adapter")
        await _finish(sessions, run_id, RunStatus.REJECTED, metrics=report,
                      error="; ".join(reasons))
        return CycleResult(run_id, RunStatus.REJECTED, name, tuple(reasons), report)
    settled = settled_answers(report) & set(ds.heldout_feedback)
    if settled:  # before the run succeeds: a run that does not, counts for nothing
        async with sessions() as s:
            await runs.settle_heldout(s, run_id=run_id,
                                      feedback_ids=[i for a in settled for i in
                                                    ds.heldout_feedback.get(a, ())])
    version = adapters.new_version(
        name=name, path=job.out_dir, rank=adapter_rank(job.out_dir),
        parent_name=parent.name if parent else None, run_id=run_id,
        dataset_hash=ds.hash, metrics=report)
    await _finish(sessions, run_id, RunStatus.SUCCEEDED, register=version, metrics=report)
    if settled:  # their conversations are trained on from now on
        async with sessions() as s:
            await release_heldout(s, conversation_ids={e.conversation_id for e in ds.heldout
                                                       if e.answer_id in settled})
    async with sessions() as s:  # forgotten while it trained: tainted as it registers
        await privacy.propagate_taint(s)
    log.info("run %s registered %s as the canary", run_id, name)
    return CycleResult(run_id, RunStatus.SUCCEEDED, name, (), report)


async def _write_memory(sessions: async_sessionmaker[AsyncSession], redactor: Redactor,
                        work: Path) -> Path:
    """The answer memory as it stands (active entries, imported ones too) for the gate's
    with-memory figures (`memory.jsonl`, read by feedback.candidate): questions redacted as
    the dataset's are, so that the held-out ones match; answers as approved (the company's
    voice). An empty file when there are no entries."""
    async with sessions() as s:
        live = await answer_memory.entries(s, status=MemoryStatus.ACTIVE)
    path = work / "memory.jsonl"
    write_jsonl([{"question": redactor(e.question), "answer": e.answer} for e in live], path)
    return path


def _trained(work: Path, report: dict[str, Any]) -> list[Example]:
    """What a run trained on (the replay pool): its SFT examples and the held-out corrections
    it settled."""
    settled = settled_answers(report)
    return read_examples(work / "sft.jsonl") + [
        e for e in read_examples(work / "heldout.jsonl") if e.answer_id in settled]


def settled_answers(report: dict[str, Any]) -> set[int]:
    """The answers whose held-out corrections the candidate was trained on after the gate
    passed it (the report's `settle`, feedback.train._settle): none if it was not kept."""
    settle = report.get("settle") or {}
    return set(settle.get("answer_ids", ())) if settle.get("kept") else set()


def _gate_on_rephrasings(ds: Dataset, job: TrainJob) -> None:
    """No correction could be held out: the gate judges on rephrasings of the trained
    corrections' questions that no training example (augmented copies included) has."""
    corrections = [e for e in ds.sft if e.source == "correction"]
    copies = augment_questions(ds.sft, job.augment, job.augment_drop, seed=job.seed)
    ds.heldout = [*ds.heldout, *rephrasings(corrections, trained=[*ds.sft, *copies])]
    ds.report["rephrasings"] = len(ds.heldout) - ds.report.get("heldout", 0)
    ds.report["heldout"] = len(ds.heldout)


def _gate_on_votes(ds: Dataset, policy: GatePolicy) -> bool:
    """Whether the gate can judge on held-out votes: enough, both liked and disliked."""
    labels = {bool(e.label) for e in ds.heldout_votes}
    return len(ds.heldout_votes) >= policy.min_heldout_votes and labels == {True, False}


def _tainted(version: AdapterVersion | None) -> bool:
    return version is not None and version.tainted_at is not None


def _write_job(ds: Dataset, template: TrainJob, cfg: LoopConfig, work: Path, name: str,
               parent_path: str | None) -> TrainJob:
    work.mkdir(parents=True, exist_ok=True)
    cfg.adapters_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl([asdict(e) for e in ds.sft], work / "sft.jsonl")
    write_jsonl([asdict(e) for e in ds.kto], work / "kto.jsonl")
    write_jsonl([asdict(e) for e in ds.heldout], work / "heldout.jsonl")
    write_jsonl([asdict(e) for e in ds.dpo], work / "dpo.jsonl")
    write_jsonl([asdict(e) for e in ds.heldout_votes], work / "heldout_votes.jsonl")
    job = replace(template, model_dir=cfg.model_dir, out_dir=str(cfg.adapters_dir / name),
                  work_dir=str(work), parent_path=parent_path,
                  system_prompt=cfg.dataset.system_prompt, parity_prompts=cfg.parity_prompts,
                  settle_gate=asdict(cfg.gate) if cfg.settle else None)
    job.save(work / "job.json")
    return job


async def _train(cfg: LoopConfig, job: TrainJob, log_path: Path) -> dict[str, Any]:
    """Run the training process; on cancellation it is killed, never left behind."""
    with log_path.open("ab") as logf:
        proc = await asyncio.create_subprocess_exec(
            *cfg.train_command, str(Path(job.work_dir) / "job.json"),
            stdout=logf, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            env=training_env())
        try:
            code = await proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            raise
    report_path = Path(job.out_dir) / "report.json"
    if code != 0 or not report_path.exists():
        tail = await asyncio.to_thread(log_path.read_text, errors="replace")
        tail = tail[-800:]
        raise TrainingFailed(f"training process exited with {code}: ...{tail}")
    return dict(json.loads(report_path.read_text()))


async def _parity(backend: InferenceBackend, name: str, job: TrainJob, report: dict[str, Any],
                  minimum: float) -> list[str]:
    """Load the candidate into the serving backend; its greedy output must match peft's."""
    await backend.load_adapter(name, job.out_dir)
    outputs = []
    try:
        system = [ChatMessage("system", job.system_prompt)] if job.system_prompt else []
        for prompt in job.parity_prompts:
            request = GenerationRequest([*system, ChatMessage("user", prompt)],
                                        max_tokens=job.parity_max_tokens, adapter=name,
                                        temperature=0.0)
            outputs.append("".join([e.text async for e in backend.stream(request)
                                    if isinstance(e, TextDelta)]))
    except InferenceError as exc:
        await _unload_quietly(backend, name)
        return [f"the backend could not serve the candidate: {exc}"]
    score = parity(outputs, report["parity_outputs"])
    report["parity"] = {"score": score, "backend_outputs": outputs}
    if score < minimum:
        await _unload_quietly(backend, name)
        return [f"backend output differs from peft (parity {score:.2f} < {minimum:.2f})"]
    return []


async def _unload_quietly(backend: InferenceBackend, name: str) -> None:
    with contextlib.suppress(InferenceError):
        await backend.unload_adapter(name)


async def _abandon(sessions: async_sessionmaker[AsyncSession], backend: InferenceBackend,
                   cfg: LoopConfig, run_id: int, error: str) -> None:
    """Close a failed run (unless another run closed it already); an adapter it wrote but
    never registered is unloaded and removed."""
    try:
        await _finish(sessions, run_id, RunStatus.FAILED, error=error[:2000])
    except runs.RunLost:
        log.warning("run %s was closed meanwhile (it had stopped heartbeating)", run_id)
    name = adapters.adapter_name(cfg.adapter_prefix, run_id)
    async with sessions() as s:
        registered = await adapters.get(s, name) is not None
    if not registered:
        if name in await backend.list_adapters():
            await _unload_quietly(backend, name)
        shutil.rmtree(inside(name, cfg.adapters_dir), ignore_errors=True)


def _cleanup_partial(adapters_dir: Path) -> None:
    """Remove temporary directories a killed training process left behind."""
    if adapters_dir.exists():
        for tmp in adapters_dir.glob(".*.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
