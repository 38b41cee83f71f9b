"""Conversation-core overhead per turn against an instant OpenAI-compatible stub, storage included.

    .venv/bin/python benchmarks/core_overhead.py [--turns 400]

For SQLite and PostgreSQL: p50/p99 ms per turn through the core (dedupe, history, prompt
fitting with the real tokenizer, streaming, storing) vs the same request sent straight to the
stub in the same run, and turns/s for one process at 32 concurrent conversations. Also the
client alone: requests/s at 32 concurrent and this process's CPU ms per request, through
`OpenAIBackend` and through the `openai` SDK's streaming (what the backend used before).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    MODEL_DIR,
    fresh_database,
    median,
    pct,
    print_table,
    start_process,
    write_json,
)
from bots.core import ConversationCore, CoreLimits, InboundMessage  # noqa: E402
from inference.base import ChatMessage, GenerationRequest  # noqa: E402
from inference.openai_backend import OpenAIBackend  # noqa: E402
from inference.prompt import PromptFitter  # noqa: E402
from storage.db import make_engine, session_factory  # noqa: E402
from tests.fakes.sinks import RecordingSink  # noqa: E402
from tests.fakes.vllm_server import free_port  # noqa: E402


async def _direct(backend: OpenAIBackend, n: int) -> list[float]:
    times = []
    for i in range(n):
        t = time.perf_counter()
        req = GenerationRequest([ChatMessage("user", f"question {i}")], max_tokens=32)
        async for _ in backend.stream(req):
            pass
        times.append((time.perf_counter() - t) * 1000)
    return times


async def _clients(backend: OpenAIBackend, base_url: str, n: int) -> list[dict[str, Any]]:
    """Requests/s at 32 concurrent and CPU ms per request: the backend, the SDK."""
    from openai import AsyncOpenAI

    sdk = AsyncOpenAI(base_url=base_url, api_key="EMPTY")

    async def through_sdk() -> None:
        chunks = await sdk.chat.completions.create(
            model="stub", messages=[{"role": "user", "content": "question"}], max_tokens=32,
            stream=True, stream_options={"include_usage": True})
        async with chunks:
            async for _ in chunks:
                pass

    async def through_backend() -> None:
        await _direct(backend, 1)

    rows = []
    for name, one in (("OpenAIBackend (aiohttp)", through_backend), ("openai SDK", through_sdk)):
        gate = asyncio.Semaphore(32)

        async def gated(one: Any = one, gate: asyncio.Semaphore = gate) -> None:
            async with gate:
                await one()

        await asyncio.gather(*(gated() for _ in range(20)))  # warm-up
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(gated() for _ in range(n)))
        rows.append({"client": name, "requests/s @32": n / (time.perf_counter() - started),
                     "client CPU ms / request": (time.process_time() - cpu) * 1000 / n})
    await sdk.close()
    return rows


async def _core_turns(core: ConversationCore, n: int,
                      concurrency: int) -> tuple[list[float], float]:
    times: list[float] = []
    run = uuid.uuid4().hex[:8]

    async def worker(w: int) -> None:
        for i in range(w, n, concurrency):
            msg = InboundMessage(channel="bench", event_id=f"{run}-{i}", chat_id=f"chat{i % 64}",
                                 user_id=f"user{i}", text=f"question {i}")
            t = time.perf_counter()
            await core.handle(msg, RecordingSink())
            times.append((time.perf_counter() - t) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return times, n / (time.perf_counter() - started)


async def main(turns: int) -> None:
    from transformers import AutoTokenizer

    port = free_port()
    stub = start_process([sys.executable, "-m", "tests.fakes.openai_stub", "--port", str(port)],
                         f"http://127.0.0.1:{port}/health")
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    rows, out = [], {}
    try:
        backend = OpenAIBackend(base_url=f"http://127.0.0.1:{port}/v1", model_name="stub")
        await _direct(backend, 20)  # warm-up
        direct = await _direct(backend, turns)
        clients = await _clients(backend, f"http://127.0.0.1:{port}/v1", turns)
        for kind in ("sqlite", "postgres"):
            async with fresh_database(kind, "chatloop_bench_core") as url:
                engine = make_engine(url)
                core = ConversationCore(
                    sessions=session_factory(engine), backend=backend,
                    fitter=PromptFitter(tokenizer, context_tokens=2048, max_tokens=32),
                    system_prompt="Be brief.",
                    limits=CoreLimits(max_tokens=32, rate_limit_per_minute=10**9),
                )
                await _core_turns(core, 20, 1)  # warm-up
                serial, _ = await _core_turns(core, turns, 1)
                _, rate32 = await _core_turns(core, turns, 32)
                await engine.dispose()
            over = [c - d for c, d in zip(sorted(serial), sorted(direct), strict=False)]
            row = {"storage": kind, "direct p50 ms": median(direct),
                   "core p50 ms": median(serial), "core p99 ms": pct(serial, 99),
                   "overhead p50 ms": median(serial) - median(direct),
                   "overhead p99 ms": pct(serial, 99) - pct(direct, 99),
                   "turns/s @32": rate32}
            rows.append(row)
            out[kind] = {**row, "overhead_sorted_p50": median(over)}
        await backend.aclose()
    finally:
        stub.kill()
    print_table(f"conversation-core overhead per turn ({turns} turns, stub at 32 tokens)", rows)
    print_table("the client alone, straight to the stub", clients)
    write_json("core_overhead", {"turns": turns, "results": out, "clients": clients})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=400)
    asyncio.run(main(ap.parse_args().turns))
