"""Time to forget a person with 100,000 messages stored.

    .venv/bin/python benchmarks/forget.py [--messages 100000] [--repeats 3] [--storage postgres]

Fills a fresh database (PostgreSQL at 127.0.0.1:5432 by default, created and dropped here)
by bulk insert: 100,000 messages in 10,000 conversations of 2,000 people (private chats and
groups), a vote or correction on most answers, one inbound event with its payload per
question, three training runs with their run identities, dataset files under a runs
directory, and three adapters. The target person has 600 of the messages (in 10 private
chats and 10 groups), votes and corrections. Then times forgetting them, median of
`--repeats`, the target's data filled in again before each: in-process
(`feedback.erasure.forget_person`: the database transaction, the dataset files, the taint)
and the command an operator runs (`chatloop forget IDENTITY`, a new process: Python start-up
and imports included). Goal: under 5 s on PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import insert, select, text, update  # noqa: E402

from benchmarks._common import ROOT, fresh_database, median, print_table, write_json  # noqa: E402
from feedback import erasure  # noqa: E402
from storage.db import make_engine, session_factory  # noqa: E402
from storage.models import (  # noqa: E402
    AdapterVersion,
    Conversation,
    Feedback,
    InboundEvent,
    Message,
    RunIdentity,
    TrainingRun,
    utcnow,
)
from storage.privacy import hashes  # noqa: E402

TARGET = "telegram:42"
PEOPLE, CONVERSATIONS, GROUPS = 2000, 10_000, 1000
TARGET_PRIVATE, TARGET_GROUPS, TARGET_PER_CHAT = 10, 10, 15  # 300 exchanges: 600 messages
RUNS, ROWS_PER_FILE = 3, 5000
T = {m.__tablename__: m.__table__ for m in (Conversation, Message, InboundEvent, Feedback)}  # type: ignore[attr-defined]


# every row of a table has the same keys (one multi-row statement)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "message": {"author_id": None, "reply_to_id": None, "status": None, "model": None},
    "feedback": {"rating": None, "correction": None, "review_status": None},
}


class Filler:
    """Bulk rows with explicit ids, so that answers can point at their questions."""

    def __init__(self) -> None:
        self.ids = {"conversation": 0, "message": 0, "inboundevent": 0, "feedback": 0}
        self.rows: dict[str, list[dict[str, Any]]] = {k: [] for k in self.ids}
        self.now = utcnow()
        self.rng = random.Random(16)

    def _add(self, table: str, **row: Any) -> int:
        self.ids[table] += 1
        self.rows[table].append({"id": self.ids[table], **_DEFAULTS.get(table, {}), **row})
        return self.ids[table]

    def conversation(self, chat: str, epoch: int = 0) -> int:
        return self._add("conversation", channel="telegram", external_chat_id=chat,
                         external_thread_id="", epoch=epoch, created_at=self.now)

    def exchange(self, conversation: int, author: str, n: int) -> tuple[int, int]:
        words = f"question {n} from {author} about order {self.rng.randrange(10**6)}"
        q = self._add("message", conversation_id=conversation, role="user", text=words,
                      author_id=author, created_at=self.now)
        a = self._add("message", conversation_id=conversation, role="assistant",
                      text=f"An answer to question {n}.", reply_to_id=q, status="ok",
                      model="m", created_at=self.now)
        self._add("inboundevent", channel="telegram", external_event_id=f"ev{q}", status="done",
                  message_id=q, received_at=self.now, attempts=0,
                  payload={"v": 1, "channel": "telegram", "event_id": f"ev{q}",
                           "chat_id": "x", "user_id": author, "text": words})
        return q, a

    def feedback(self, answer: int, voter: str, correction: bool = False) -> None:
        extra = ({"correction": f"A better answer from {voter}.", "review_status": "approved",
                  "trusted": True} if correction else
                 {"rating": self.rng.choice((1, -1)), "trusted": False})
        self._add("feedback", answer_id=answer, voter_id=voter, source="telegram",
                  created_at=self.now, updated_at=self.now, **extra)

    async def flush(self, engine: Any) -> None:
        async with engine.begin() as conn:
            for table in ("conversation", "message", "inboundevent", "feedback"):
                rows = self.rows[table]
                for i in range(0, len(rows), 2000):
                    await conn.execute(insert(T[table]), rows[i:i + 2000])
                rows.clear()
            if engine.dialect.name == "postgresql":  # explicit ids: move the sequences on
                for table, top in self.ids.items():
                    await conn.execute(text(f"SELECT setval('{table}_id_seq', {max(top, 1)})"))


def fill_background(f: Filler, messages: int) -> list[tuple[int, int]]:
    """Everyone but the target: returns (conversation, answer) of every exchange."""
    people = [f"telegram:{1000 + i}" for i in range(PEOPLE)]
    convs = [(f.conversation(people[k % PEOPLE][9:], k // PEOPLE), people[k % PEOPLE])
             for k in range(CONVERSATIONS - GROUPS)]
    convs += [(f.conversation(f"-100{k}"), "") for k in range(GROUPS)]
    answers = []
    for n in range(messages // 2):
        conv, owner = convs[n % len(convs)]
        author = owner or f.rng.choice(people)
        answers.append((conv, f.exchange(conv, author, n)[1]))
    for _, answer in answers:
        if f.rng.random() < 0.6:
            f.feedback(answer, f.rng.choice(people), correction=f.rng.random() < 0.05)
    return answers


def fill_target(f: Filler, groups: list[int], others: list[int]) -> list[tuple[int, int]]:
    """The target's 600 messages (10 private chats, 10 groups), votes and corrections."""
    out = []
    chats = [f.conversation("42", epoch) for epoch in range(TARGET_PRIVATE)] + groups
    for conv in chats:
        for _ in range(TARGET_PER_CHAT):
            out.append((conv, f.exchange(conv, TARGET, f.ids["message"])[1]))
    for answer in f.rng.sample(others, 100):
        f.feedback(answer, TARGET, correction=f.rng.random() < 0.2)
    return out


def write_datasets(runs_dir: Path, answers: list[tuple[int, int]], target: list[tuple[int, int]],
                   rng: random.Random) -> None:
    """Each run's sft/kto/heldout.jsonl: rows of sampled exchanges, the target's among them."""
    for run in range(1, RUNS + 1):
        work = runs_dir / f"run-{run}"
        work.mkdir(parents=True, exist_ok=True)
        for name in ("sft", "kto", "heldout"):
            picked = rng.sample(answers, min(ROWS_PER_FILE, len(answers))) + rng.sample(target, 20)
            with (work / f"{name}.jsonl").open("w") as out:
                for conv, answer in picked:
                    out.write(json.dumps({
                        "conversation_id": conv, "answer_id": answer, "source": "correction",
                        "prompt": [{"role": "user", "content": f"question of {answer}"}],
                        "completion": "An answer.", "label": None, "rejected": None}) + "\n")


async def fill_runs(sessions: Any, people: list[str]) -> None:
    """Three finished runs (each with 500 identities, the target's included) and adapters."""
    async with sessions() as s:
        hashed = await hashes(s, [TARGET, *people])
        for run in range(1, RUNS + 1):
            s.add(TrainingRun(id=run, status="succeeded", trigger="manual"))
            await s.flush()
            chosen = [TARGET, *random.Random(run).sample(people, 499)]
            await s.execute(insert(RunIdentity), [{"run_id": run, "identity_hash": hashed[p]}
                                                  for p in set(chosen)])
            s.add(AdapterVersion(name=f"fb-v{run}", path=f"/adapters/fb-v{run}", rank=8,
                                 run_id=run, parent_name=f"fb-v{run - 1}" if run > 1 else None,
                                 status="active" if run == RUNS else "retired"))
        await s.commit()


async def reset_taint(sessions: Any) -> None:
    async with sessions() as s:
        for table in (TrainingRun, AdapterVersion):
            await s.execute(update(table).values(tainted_at=None))
        await s.commit()


async def count(sessions: Any) -> int:
    async with sessions() as s:
        return int((await s.execute(select(text("count(*)")).select_from(Message))).scalar())


def cli_forget(url: str, runs_dir: Path) -> float:
    env = {**os.environ, "CHATLOOP_DATABASE_URL": url, "CHATLOOP_LEARN_RUNS_DIR": str(runs_dir)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "chatloop.cli", "forget", TARGET], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or "forgot" not in done.stdout:
        raise RuntimeError(f"chatloop forget failed: {done.stderr or done.stdout}")
    return elapsed


async def bench(storage: str, messages: int, repeats: int) -> list[dict[str, Any]]:
    async with fresh_database(storage, "forget_bench") as url:
        engine = make_engine(url)
        sessions = session_factory(engine)
        runs_dir = ROOT / "var/bench" / f"forget-runs-{os.getpid()}"
        f = Filler()
        started = time.perf_counter()
        background_messages = messages - TARGET_PER_CHAT * 2 * (TARGET_PRIVATE + TARGET_GROUPS)
        answers = fill_background(f, background_messages)
        groups = list(range(CONVERSATIONS - GROUPS + 1, CONVERSATIONS + 1))[:TARGET_GROUPS]
        await f.flush(engine)
        await fill_runs(sessions, [f"telegram:{1000 + i}" for i in range(PEOPLE)])
        print(f"{storage}: filled in {time.perf_counter() - started:.1f}s")
        stored = 0
        results: dict[str, list[float]] = {"in-process": [], "chatloop forget": []}
        detail: dict[str, Any] = {}
        try:
            for mode in results:
                for _ in range(repeats):
                    target = fill_target(f, groups, [a for _, a in answers])
                    await f.flush(engine)
                    await reset_taint(sessions)
                    write_datasets(runs_dir, answers, target, f.rng)
                    stored = await count(sessions)  # the target's data included
                    if mode == "in-process":
                        t = time.perf_counter()
                        report = await erasure.forget_person(
                            sessions, identity=TARGET, runs_dir=runs_dir,
                            adapters_dir=Path("/adapters"), actor="cli:bench")
                        results[mode].append(time.perf_counter() - t)
                        detail = {**report.erased.counts, "dataset_rows": report.rows,
                                  "files": len(report.files),
                                  "tainted_adapters": len(report.tainted_adapters)}
                    else:
                        results[mode].append(await asyncio.to_thread(cli_forget, url, runs_dir))
        finally:
            await engine.dispose()
            for path in sorted(runs_dir.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            runs_dir.rmdir()
        return [{"storage": storage, "mode": mode, "messages": stored,
                 "median s": median(times), "runs s": " ".join(f"{t:.2f}" for t in times),
                 **({"deleted": detail} if mode == "in-process" else {})}
                for mode, times in results.items()]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--storage", nargs="+", default=["postgres"],
                        choices=["postgres", "sqlite"])
    args = parser.parse_args()
    rows = []
    for storage in args.storage:
        rows += await bench(storage, args.messages, args.repeats)
    print_table("forget one person (600 of the messages, 100 votes and corrections)",
                [{k: v for k, v in r.items() if k != "deleted"} for r in rows])
    print("\ndeleted per forget:", json.dumps(rows[0].get("deleted")))
    write_json("forget", {"messages": args.messages, "repeats": args.repeats,
                          "goal_s": 5.0, "rows": rows})


if __name__ == "__main__":
    asyncio.run(main())
