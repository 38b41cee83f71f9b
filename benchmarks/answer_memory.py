"""Answer memory: does an approved correction help the next customer at once, and after training?

On the synthetic company set (feedback/data/company.json), the way reviewers work: for each
intent a customer asks two phrasings in Telegram, the reviewer votes 👎 and writes the
company's answer (trusted: approved at once, an answer-memory entry). Every other phrasing
is unseen. Token-F1 against the company's answer on the unseen phrasings, through the
conversation core with the real bundled model (embedded engine):
  base model; memory only (asked right after the last approval); after one `chatloop train
  --now` cycle (real TRL training, the loop's defaults) without memory; memory + adapter.
Also: the thresholds' calibration (verbatim precision and coverage on the unseen phrasings,
false verbatim answers on feedback/data/general_prompts.jsonl); the time from a
correction's approval to the first answer that uses it across two replicas (two cores, each
with its own engine and index) on PostgreSQL; retrieval cost per turn with 10,000 and
100,000 entries (p50/p99; same-run baseline: the dense part alone).

    .venv/bin/python benchmarks/answer_memory.py [--intents 30] [--quick] [--no-train]

--quick: 10 intents, no training, 10,000 entries only. Prints a table and writes
benchmarks/results/answer_memory.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bots.core import ConversationCore, CoreLimits, InboundMessage, StaticRouter  # noqa: E402
from bots.core.memory import AnswerMemory  # noqa: E402
from chatloop.app import loop_config  # noqa: E402
from chatloop.settings import Settings  # noqa: E402
from feedback.evaluate import token_f1  # noqa: E402
from feedback.loop import run_cycle  # noqa: E402
from inference.base import Finished, GenerationRequest, StreamEvent, TextDelta  # noqa: E402
from inference.embedded import EmbeddedBackend  # noqa: E402
from inference.memory import Doc, HybridIndex, load_embedder  # noqa: E402
from inference.prompt import PromptFitter  # noqa: E402
from storage import adapters as adapter_versions  # noqa: E402
from storage.db import make_engine, session_factory  # noqa: E402
from storage.migrate import upgrade_async  # noqa: E402

MODEL = ROOT / "var/models/SmolLM2-135M-Instruct"
COMPANY = json.loads((ROOT / "feedback/data/company.json").read_text())
GENERAL = [json.loads(line)["question"] for line in
           (ROOT / "feedback/data/general_prompts.jsonl").read_text().splitlines() if line]
SYSTEM = "You are the customer-service assistant of Bramblewood Outfitters. Answer briefly."
REVIEWER = "telegram:900"
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULTS = Settings(_env_file=None).memory


class Sink:
    async def begin(self) -> None: ...
    async def update(self, text: str) -> None: ...
    async def finish(self, text: str, answer_id: int) -> None: ...
    async def fail(self, text: str) -> None: ...
    async def notice(self, text: str) -> None: ...


class Echo:
    """A backend that answers at once (the replica timing measures the memory, not a model)."""

    model_name = "echo"

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        yield TextDelta("I do not know.")
        yield Finished("stop", 1, 1)

    async def aclose(self) -> None: ...


def core(sessions: Any, backend: Any, fitter: PromptFitter, memory: AnswerMemory | None,
         adapter: str | None = None, max_tokens: int = 48) -> ConversationCore:
    return ConversationCore(sessions=sessions, backend=backend, fitter=fitter,
                            system_prompt=SYSTEM, router=StaticRouter(adapter),
                            limits=CoreLimits(max_tokens=max_tokens, rate_limit_per_minute=10**6),
                            reviewers=frozenset({REVIEWER}), memory=memory)


def memory_for(sessions: Any, embedder: Any) -> AnswerMemory:
    return AnswerMemory(sessions, HybridIndex(embedder), answer_at=DEFAULTS.answer_threshold,
                        refer_at=DEFAULTS.reference_threshold, refresh_s=DEFAULTS.refresh_s)


async def ask(c: ConversationCore, text: str, channel: str = "telegram",
              user: str = "111") -> Any:
    chat = uuid.uuid4().hex[:12]  # each question its own conversation
    return await c.handle(InboundMessage(channel, f"e-{chat}", chat, user, text), Sink())


async def correct_all(c: ConversationCore, intents: list[dict[str, Any]]) -> float:
    """Two phrasings per intent asked, voted 👎 and corrected by the reviewer; the time of
    the last approval."""
    for it in intents:
        for q in it["questions"][:2]:
            r = await ask(c, q)
            await c.vote(answer_id=r.answer_id, voter_id=REVIEWER, rating=-1, source="telegram")
            await c.correct(answer_id=r.answer_id, voter_id=REVIEWER, text=it["answer"],
                            source="telegram")
    return time.monotonic()


async def f1_on_unseen(c: ConversationCore, intents: list[dict[str, Any]]) -> dict[str, Any]:
    scores, verbatim, referenced = [], 0, 0
    for it in intents:
        for q in it["questions"][2:]:
            r = await ask(c, q, channel="slack", user="T0/U222")
            scores.append(token_f1(r.text, it["answer"]))
            verbatim += r.memory_entry_id is not None
    if c.memory is not None:
        referenced = sum(1 for it in intents for q in it["questions"][2:]
                         if not (await c.memory.recall(q)).verbatim
                         and (await c.memory.recall(q)).references)
    return {"f1": round(statistics.mean(scores), 3), "n": len(scores), "verbatim": verbatim,
            "referenced": referenced}


async def calibration(memory: AnswerMemory, intents: list[dict[str, Any]],
                      entry_intent: dict[int, str]) -> list[dict[str, Any]]:
    """Verbatim precision/coverage on the unseen phrasings and false verbatim answers on the
    general prompts, per answer threshold."""
    tops = []
    for it in intents:
        for q in it["questions"][2:]:
            hits = memory.index.search(q, k=1)
            tops.append((hits[0].score, entry_intent[hits[0].id] == it["id"]))
    general = [memory.index.search(q, k=1)[0].score for q in GENERAL]
    out = []
    for th in (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95):
        above = [ok for s, ok in tops if s >= th]
        out.append({"threshold": th, "coverage": round(len(above) / len(tops), 3),
                    "precision": round(sum(above) / len(above), 3) if above else None,
                    "general_false": round(sum(s >= th for s in general) / len(general), 3)})
    return out


async def replicas(embedder: Any, fitter: PromptFitter, pg_url: str, rounds: int
                   ) -> dict[str, Any]:
    """Approval in replica A -> first memory answer in replica B, on PostgreSQL."""
    import asyncpg

    name = f"chatloop_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = pg_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        await upgrade_async(url)
        engines = [make_engine(url), make_engine(url)]
        a, b = (core(session_factory(e), Echo(), fitter,
                     memory_for(session_factory(e), embedder)) for e in engines)
        times = []
        for i, it in enumerate(COMPANY["intents"][:rounds]):
            r = await ask(a, it["questions"][0])
            await ask(b, "hello")  # B is warm, its index up to date
            await a.correct(answer_id=r.answer_id, voter_id=REVIEWER, text=it["answer"],
                            source="telegram")
            approved = time.monotonic()
            while (await ask(b, it["questions"][1], "slack", f"T0/U{i}")
                   ).memory_entry_id is None:
                if time.monotonic() - approved > 30:
                    break
                await asyncio.sleep(0.02)
            times.append(time.monotonic() - approved)
        for e in engines:
            await e.dispose()
        return {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3),
                "rounds": len(times)}
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def retrieval_cost(embedder: Any, sizes: list[int], queries: int = 500) -> list[dict[str, Any]]:
    """Per-turn search time with `n` entries (company questions made distinct with numbers),
    against the dense part alone."""
    rng = np.random.default_rng(0)
    base = [(q, it["answer"]) for it in COMPANY["intents"] for q in it["questions"]]
    out = []
    for n in sizes:
        docs = [Doc(i, f"{base[i % len(base)][0]} order {rng.integers(10**6)}",
                    base[i % len(base)][1]) for i in range(n)]
        index = HybridIndex(embedder)
        t = time.perf_counter()
        index.upsert(docs)
        build = time.perf_counter() - t
        qs = [base[i % len(base)][0] for i in rng.integers(len(base), size=queries)]
        hybrid, dense = [], []
        for q in qs:
            t = time.perf_counter()
            index.search(q)
            hybrid.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            v = embedder.embed([q])[0]
            s = index._vectors[:n] @ v
            np.argpartition(-s, 3)[:3]
            dense.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        index.upsert([Doc(n + 1, "a brand new question", "a brand new answer")])
        add_ms = (time.perf_counter() - t) * 1000
        out.append({"entries": n, "build_s": round(build, 2), "add_one_ms": round(add_ms, 2),
                    "p50_ms": round(float(np.percentile(hybrid, 50)), 3),
                    "p99_ms": round(float(np.percentile(hybrid, 99)), 3),
                    "dense_only_p50_ms": round(float(np.percentile(dense, 50)), 3),
                    "dense_only_p99_ms": round(float(np.percentile(dense, 99)), 3)})
    return out


async def main(a: argparse.Namespace) -> dict[str, Any]:
    intents = COMPANY["intents"][:a.intents]
    embedder = load_embedder(DEFAULTS.embedder)
    tmp = Path(tempfile.mkdtemp(prefix="answer-memory-"))
    url = f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    await upgrade_async(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    backend = EmbeddedBackend(str(MODEL), model_name=MODEL.name)
    fitter = PromptFitter(backend.tokenizer, context_tokens=2048, max_tokens=48)
    memory = memory_for(sessions, embedder)
    out: dict[str, Any] = {"intents": len(intents), "embedder": embedder.name,
                           "answer_threshold": DEFAULTS.answer_threshold,
                           "reference_threshold": DEFAULTS.reference_threshold}
    plain, with_memory = core(sessions, backend, fitter, None), core(sessions, backend,
                                                                      fitter, memory)
    out["base"] = await f1_on_unseen(plain, intents)
    approved = await correct_all(with_memory, intents)
    r = await ask(with_memory, intents[0]["questions"][2], "slack", "T0/U1")
    out["approval_to_first_use_s_same_process"] = round(time.monotonic() - approved, 3)
    out["memory_only"] = await f1_on_unseen(with_memory, intents)
    async with sessions() as s:
        from storage import memory as store

        entry_intent = {e.id: next(it["id"] for it in intents if it["answer"] == e.answer)
                        for e in await store.entries(s)}
    out["calibration"] = await calibration(memory, intents, entry_intent)
    general_verbatim = sum((await memory.recall(q)).verbatim is not None for q in GENERAL)
    out["general_false_memory"] = round(general_verbatim / len(GENERAL), 3)
    del r
    if a.train:
        settings = Settings(_env_file=None, storage={"database_url": url},
                            inference={"model": str(MODEL)}, core={"system_prompt": SYSTEM},
                            learn={"runs_dir": str(tmp / "runs"),
                                   "adapters_dir": str(tmp / "adapters")})
        t = time.perf_counter()
        result = await run_cycle(sessions, backend, loop_config(settings), trigger="manual")
        out["train"] = {"status": result.status, "adapter": result.adapter,
                        "seconds": round(time.perf_counter() - t), "reasons": result.reasons}
        async with sessions() as s:
            version = next((v for v in await adapter_versions.lifecycle(s)
                            if v.name == result.adapter), None)
        if version is not None:
            await backend.load_adapter(version.name, version.path)
            out["adapter_only"] = await f1_on_unseen(
                core(sessions, backend, fitter, None, version.name), intents)
            out["memory_and_adapter"] = await f1_on_unseen(
                core(sessions, backend, fitter, memory, version.name), intents)
    await backend.aclose()
    await engine.dispose()
    if not a.no_pg:
        out["replicas_pg"] = await replicas(embedder, fitter, a.pg_url, a.replica_rounds)
    out["retrieval"] = retrieval_cost(embedder, [10_000] if a.quick else [10_000, 100_000])
    return out


def table(r: dict[str, Any]) -> str:
    lines = [f"answer memory, {r['intents']} intents x 2 corrections, embedder {r['embedder']}"
             f" (answer >= {r['answer_threshold']}, reference >= {r['reference_threshold']})",
             f"{'condition':<28}{'token-F1':>9}{'verbatim':>10}{'referenced':>12}"]
    for key in ("base", "memory_only", "adapter_only", "memory_and_adapter"):
        if key in r:
            v = r[key]
            lines.append(f"{key:<28}{v['f1']:>9}{v['verbatim']:>10}{v['referenced']:>12}"
                         f"   (n={v['n']})")
    if "train" in r:
        lines.append(f"train --now: {r['train']['status']} in {r['train']['seconds']} s")
    lines.append(f"false memory answers on general prompts: {r['general_false_memory']:.1%}")
    lines.append("threshold  coverage  precision  general_false")
    lines += [f"{c['threshold']:>9}{c['coverage']:>10}{c['precision']!s:>11}"
              f"{c['general_false']:>15}" for c in r["calibration"]]
    if "replicas_pg" in r:
        p = r["replicas_pg"]
        lines.append(f"approval -> first use in the other replica (PostgreSQL): median "
                     f"{p['median_s']} s, max {p['max_s']} s over {p['rounds']}")
    for c in r["retrieval"]:
        lines.append(f"retrieval with {c['entries']:>7} entries: p50 {c['p50_ms']} ms, p99 "
                     f"{c['p99_ms']} ms (dense only p50 {c['dense_only_p50_ms']}, p99 "
                     f"{c['dense_only_p99_ms']}); build {c['build_s']} s, add one "
                     f"{c['add_one_ms']} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--intents", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="10 intents, no training, 10k only")
    ap.add_argument("--no-train", dest="train", action="store_false")
    ap.add_argument("--no-pg", action="store_true", help="skip the two-replica timing")
    ap.add_argument("--pg-url", default=PG_URL)
    ap.add_argument("--replica-rounds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/answer_memory.json")
    args = ap.parse_args()
    if args.quick:
        args.intents, args.train = 10, False
    result = asyncio.run(main(args))
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
