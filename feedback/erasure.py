"""Forget and retention beyond the database: dataset files, exports, tainted runs, and the
guard that keeps a run from training on data deleted while it built its dataset.

The database part is `storage.forget` (one transaction). Then every JSONL file under the
runs directory (each run's sft/kto/heldout.jsonl) and every export `chatloop feedback
export` wrote (their paths are listed in `exports.txt` under the runs directory) is
rewritten without the rows of the conversations and answers deleted; the runs whose
datasets used the person, or whose files lost rows, are tainted, and with them their
adapters (storage.privacy). Retention deletes but taints nothing: it bounds what is stored,
and adapters are retrained anyway.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from feedback.examples import Dataset, Example, write_jsonl
from inference.adapters import inside
from inference.errors import AdapterRejected
from storage import audit, forget, privacy
from storage.forget import Erased
from storage.models import utcnow

log = logging.getLogger(__name__)

EXPORTS = "exports.txt"
_RUN_DIR = re.compile(r"run-(\d+)")


@dataclass
class Report:
    """What a forget or a retention pass did."""

    erased: Erased
    files: list[Path] = field(default_factory=list)  # dataset files rewritten
    rows: int = 0  # dataset rows removed from them
    tainted_runs: list[int] = field(default_factory=list)
    tainted_adapters: list[str] = field(default_factory=list)


# ---- forget and retention ----


async def forget_person(sessions: async_sessionmaker[AsyncSession], *, identity: str,
                        runs_dir: Path, adapters_dir: Path, actor: str) -> Report:
    """Forget a person: their data in the database (one transaction), their dataset rows in
    files, and the runs and adapters trained on them marked tainted."""
    erased = await _retrying(sessions, lambda s: forget.forget_identity(
        s, identity=identity, actor=actor))
    report = await _scrub(erased, runs_dir)
    assert erased.identity_hash is not None
    async with sessions() as s:
        runs = await privacy.runs_of(s, erased.identity_hash) | _runs_in(report.files, runs_dir)
    await _taint(sessions, report, runs, runs_dir, adapters_dir)
    return report


async def forget_conversation(sessions: async_sessionmaker[AsyncSession], *,
                              conversation_id: int, runs_dir: Path, adapters_dir: Path,
                              actor: str) -> Report:
    """Forget a conversation: the database part, its dataset rows, and the runs whose
    datasets held them (and their adapters) tainted."""
    erased = await _retrying(sessions, lambda s: forget.forget_conversation(
        s, conversation_id=conversation_id, actor=actor))
    report = await _scrub(erased, runs_dir)
    await _taint(sessions, report, _runs_in(report.files, runs_dir), runs_dir, adapters_dir)
    return report


async def _taint(sessions: async_sessionmaker[AsyncSession], report: Report, runs: set[int],
                 runs_dir: Path, adapters_dir: Path) -> None:
    """Taint these runs and their adapters, and drop the sample answers from their reports
    (in the database, and the report.json files of the runs and the adapters; an adapter
    path from the database is only written to inside the adapters directory)."""
    async with sessions() as s:
        report.tainted_adapters = await privacy.taint(s, run_ids=runs)
        adapters = await privacy.adapter_paths(s, run_ids=runs)
    report.tainted_runs = sorted(runs)
    reports = [p for r in runs for p in (runs_dir / f"run-{r}").rglob("report.json")]
    for path in adapters:
        try:
            reports.append(inside(path, adapters_dir) / "report.json")
        except AdapterRejected:
            log.warning("forget: adapter path %s is outside %s: its report is left as it is",
                        path, adapters_dir)
    await asyncio.to_thread(_strip_reports, reports)


def _strip_reports(paths: Iterable[Path]) -> None:
    for path in paths:
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # gone, or not a report
        if (stripped := privacy.without_samples(report)) != report:
            tmp = path.with_name(f".{path.name}.forget-{os.getpid()}")
            tmp.write_text(json.dumps(stripped, indent=1), encoding="utf-8")
            tmp.replace(path)


async def apply_retention(sessions: async_sessionmaker[AsyncSession], *, days: int,
                          runs_dir: Path, actor: str = audit.RETENTION) -> Report:
    """Delete what is older than `days` days, in the database and in dataset files."""
    cutoff = utcnow() - timedelta(days=days)
    erased = await _retrying(sessions, lambda s: forget.delete_older_than(
        s, cutoff=cutoff, actor=actor, days=days))
    if not erased.anything:
        return Report(erased)
    report = await _scrub(erased, runs_dir)
    log.info("retention (%s days): deleted %s; %s dataset rows from %s files", days,
             erased.counts, report.rows, len(report.files))
    return report


async def _retrying(sessions: async_sessionmaker[AsyncSession],
                    erase: Callable[[AsyncSession], Awaitable[Erased]]) -> Erased:
    """Run a deletion; again if a message arrived in a conversation it deletes meanwhile
    (the database refuses to delete the conversation then, and the transaction rolls back)."""
    for attempt in range(3):
        async with sessions() as s:
            try:
                return await erase(s)
            except IntegrityError:
                if attempt == 2:
                    raise
                log.info("a message arrived while deleting: trying again")
    raise AssertionError("unreachable")


async def _scrub(erased: Erased, runs_dir: Path) -> Report:
    files, rows = await asyncio.to_thread(scrub_files, runs_dir, erased.conversations,
                                          erased.answers)
    return Report(erased, files, rows)


# ---- dataset files and exports ----


def register_export(runs_dir: Path, path: Path) -> None:
    """Remember an export's path, so that forget and retention rewrite it too."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    known = set(export_paths(runs_dir))
    if path.resolve() not in known:
        with (runs_dir / EXPORTS).open("a", encoding="utf-8") as f:
            f.write(f"{path.resolve()}\n")


def export_paths(runs_dir: Path) -> list[Path]:
    listed = runs_dir / EXPORTS
    if not listed.exists():
        return []
    return [Path(line) for line in listed.read_text(encoding="utf-8").splitlines() if line]


def scrub_files(runs_dir: Path, conversations: Collection[int], answers: Collection[int]
                ) -> tuple[list[Path], int]:
    """Rewrite every dataset file (JSONL under `runs_dir`, and the exports) without the rows
    of these conversations and answers. Returns the files changed and the rows removed."""
    if not conversations and not answers:
        return [], 0
    runs_dir.mkdir(parents=True, exist_ok=True)
    changed, removed = [], 0
    # one rewriter at a time: two concurrent ones would each put back what the other removed
    with (runs_dir / ".erasure.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        paths = sorted(runs_dir.rglob("*.jsonl"))
        paths += [p for p in export_paths(runs_dir) if p.exists() and p not in paths]
        for path in paths:
            if n := _rewrite(path, set(conversations), set(answers)):
                changed.append(path)
                removed += n
    return changed, removed


def _rewrite(path: Path, conversations: set[int], answers: set[int]) -> int:
    """Rewrite `path` without those rows (atomically, only if some go); returns how many."""
    kept, removed = [], 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and (row.get("conversation_id") in conversations
                                          or row.get("answer_id") in answers):
                removed += 1
            else:
                kept.append(line)
    if removed:
        tmp = path.with_name(f".{path.name}.forget-{os.getpid()}")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)
    return removed


def _runs_in(paths: Iterable[Path], runs_dir: Path) -> set[int]:
    """The runs whose directories (runs_dir/run-N) hold these files."""
    out = set()
    for p in paths:
        try:
            first = p.resolve().relative_to(runs_dir.resolve()).parts[0]
        except (ValueError, IndexError):
            continue  # an export elsewhere
        if m := _RUN_DIR.fullmatch(first):
            out.add(int(m.group(1)))
    return out


# ---- the training run's guard ----


class ErasedMeanwhile(RuntimeError):
    """Data was deleted (forget, retention) while the run built its dataset."""


async def erasure_mark(sessions: async_sessionmaker[AsyncSession]) -> int:
    """Taken before a run reads any data: `record_run_data` compares it."""
    async with sessions() as s:
        return await audit.erasure_count(s)


async def record_run_data(sessions: async_sessionmaker[AsyncSession], *, run_id: int,
                          examples: Iterable[Example], mark: int, work: Path) -> None:
    """Record whose data the run's dataset (already written to `work`) uses; if a forget or
    retention committed since `mark`, delete the dataset files and raise ErasedMeanwhile.

    Either that deletion committed before this check (it is seen here), or it comes after
    the identities are recorded and the files written (it taints this run and rewrites its
    files itself): no run trains on deleted data without being tainted."""
    examples = list(examples)
    async with sessions() as s:
        await privacy.record_run_identities(
            s, run_id=run_id, conversation_ids={e.conversation_id for e in examples},
            answer_ids={e.answer_id for e in examples})
        if await audit.erasure_count(s) == mark:
            return
    await asyncio.to_thread(_drop_datasets, work)
    raise ErasedMeanwhile("data was deleted (forget or retention) while this run built its "
                          "dataset: the next run builds it again")


def _drop_datasets(work: Path) -> None:
    for path in work.glob("*.jsonl"):
        path.unlink()


async def export(sessions: async_sessionmaker[AsyncSession], *, runs_dir: Path, out: Path,
                 build: Callable[[AsyncSession], Awaitable[Dataset]]) -> Dataset:
    """Build a dataset, write it to `out` as JSONL and register the export (so forget and
    retention rewrite it); built again if data was deleted meanwhile (as `record_run_data`)."""
    for _ in range(3):
        mark = await erasure_mark(sessions)
        async with sessions() as s:
            ds = await build(s)
        await asyncio.to_thread(write_jsonl, ds.rows(), out)
        await asyncio.to_thread(register_export, runs_dir, out)
        if await erasure_mark(sessions) == mark:
            return ds
    raise ErasedMeanwhile("data kept being deleted while the export was built: try again")
