"""Telegram gateway throughput and latency against the fake Bot API, polling and webhook mode.

    .venv/bin/python benchmarks/telegram.py [--users 200] [--per-user 5] [--storage sqlite]
                                            [--repeat 3] [--sends-per-s 1000]

200 simulated users in private chats (the fake Bot API, in its own process, sends each user's
next message when the previous answer arrives), an instant scripted model, one gateway (this
process), and for comparison the same load straight into the conversation core (the
ceiling the channel can reach on this machine). Reports updates/s handled, p50/p99 latency
from an update being available to its final answer reaching the Bot API (gateway plus the
fake's own handling), lost / doubled answers (checked in the fake and in the database), Bot
API calls per answer, and CPU ms per update of the gateway (this process) and of the fake:
1000 / the gateway's figure is the rate one gateway process would reach with a core to
itself, as here it shares two with the fake and the database. At 200 users the latency is
mostly queueing (200 questions in flight); a light run with 5 users shows the latency one
message sees in the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from benchmarks._common import (  # noqa: E402
    MODEL_DIR,
    fresh_database,
    median,
    pct,
    print_table,
    process_cpu_s,
    start_process,
    write_json,
)
from bots.core import ConversationCore, CoreLimits, InboundMessage  # noqa: E402
from bots.gateway import create_app  # noqa: E402
from bots.telegram import TelegramChannel, TelegramOptions, make_bot  # noqa: E402
from inference.prompt import PromptFitter  # noqa: E402
from storage.db import make_engine, session_factory  # noqa: E402
from storage.models import InboundEvent, Message  # noqa: E402
from tests.fakes.inference import ScriptedBackend  # noqa: E402
from tests.fakes.sinks import RecordingSink  # noqa: E402
from tests.fakes.telegram_api import TOKEN  # noqa: E402
from tests.fakes.vllm_server import free_port  # noqa: E402

SENDS = ("sendMessage", "editMessageText", "sendMessageDraft")
# the bot's send budget while measuring the gateway (the product's default, 20 a second,
# would be what is measured): as for a bot with paid broadcasts
LIFTED_BUDGET = 1000.0
LIGHT_USERS = 5


Window = Callable[[], Awaitable[None]]


async def _run(mode: str, storage: str, users: int, per_user: int, tokenizer: Any,
               deadline_s: float, sends_per_s: float = LIFTED_BUDGET,
               windows: Sequence[Window] = ()) -> dict[str, Any]:
    async with fresh_database(storage, "chatloop_bench_tg") as url:
        return await _run_on(url, mode, storage, users, per_user, tokenizer, deadline_s,
                             sends_per_s, windows)


async def _run_on(db_url: str, mode: str, storage: str, users: int, per_user: int,
                  tokenizer: Any, deadline_s: float, sends_per_s: float,
                  windows: Sequence[Window] = ()) -> dict[str, Any]:
    """One gateway measured over the load of `users` x `per_user`; with `windows`, that load
    once per window on new chats, each window's coroutine awaited before its load starts
    (benchmarks/observability.py switches telemetry there), rate and CPU kept per window."""
    api_port, gw_port = free_port(), free_port()
    fake = start_process([sys.executable, "-m", "tests.fakes.telegram_api", "--port",
                          str(api_port)], f"http://127.0.0.1:{api_port}/_fake/stats")
    engine = make_engine(db_url)
    core = _core(engine, tokenizer)
    options = TelegramOptions(mode=mode, webhook_url=f"http://127.0.0.1:{gw_port}/telegram/webhook",
                              webhook_secret="bench-secret", poll_timeout_s=5,
                              sends_per_s=sends_per_s)
    channel = TelegramChannel(core=core, bot=make_bot(TOKEN, api_base=f"http://127.0.0.1:{api_port}"),
                              options=options)

    async def ready() -> dict[str, str]:
        return {}

    server = uvicorn.Server(uvicorn.Config(create_app(channels=[channel], ready=ready),
                                           host="127.0.0.1", port=gw_port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    windows = windows or [_nothing]
    per_window = users * per_user
    total = per_window * len(windows)
    rates: list[dict[str, float]] = []
    try:
        while not server.started:  # noqa: ASYNC110 (uvicorn offers no event for this)
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as c:
            # warm-up (first DB connections, first prompt template render): one user, not counted
            await c.post("/_fake/load", json={"users": 1, "per_user": 3, "first_chat": 9_000})
            await _until(c, 3, deadline_s)
            elapsed, cpu, fake_cpu = 0.0, 0.0, 0.0
            for n, window in enumerate(windows):
                await window()
                began, cpu_began = time.perf_counter(), time.process_time()
                fake_began = process_cpu_s(fake.pid)
                await c.post("/_fake/load", json={"users": users, "per_user": per_user,
                                                  "first_chat": 10_000 + n * users})
                await _until(c, 3 + (n + 1) * per_window, deadline_s)
                took, cpu_took = time.perf_counter() - began, time.process_time() - cpu_began
                elapsed, cpu = elapsed + took, cpu + cpu_took
                fake_cpu += process_cpu_s(fake.pid) - fake_began
                rates.append({"updates/s": per_window / took,
                              "gateway CPU ms /update": cpu_took * 1000 / per_window})
            await asyncio.sleep(0.5)  # anything doubled would arrive now
            stats = (await c.get("/_fake/stats")).json()
    finally:
        server.should_exit = True
        await serving
        fake.kill()
    async with session_factory(engine)() as s:
        answers = (await s.execute(select(func.count()).select_from(Message)
                                   .where(Message.role == "assistant", Message.status == "ok"))
                   ).scalar()
        done = (await s.execute(select(func.count()).select_from(InboundEvent)
                                .where(InboundEvent.status == "done"))).scalar()
    await engine.dispose()
    finals = {k: v for k, v in stats["finals"].items() if int(k) != 9_000}
    lat = [x * 1000 for x in stats["latencies"][3:]]
    answered = sum(finals.values())
    methods = stats["methods"]
    return {
        "mode": mode, "storage": storage, "updates": total, "answered": answered,
        "lost": total - sum(min(n, per_user) for n in finals.values()),
        "doubled": sum(max(0, n - per_user) for n in finals.values())
        + max(0, answers - 3 - total),
        "db answers": answers - 3, "db events done": done - 3,
        "updates/s": answered / elapsed, "p50 ms": median(lat), "p99 ms": pct(lat, 99),
        "gateway CPU ms /update": cpu * 1000 / total,
        "fake CPU ms /update": fake_cpu * 1000 / total,
        "sends+edits+drafts /answer": sum(methods.get(m, 0) for m in SENDS) / max(answered, 1),
        "all calls /answer": sum(methods.values()) / max(answered, 1),
        "methods": methods, "windows": rates,
    }


async def _nothing() -> None:
    return None


async def _core_only(storage: str, users: int, per_user: int, tokenizer: Any) -> dict[str, Any]:
    async with fresh_database(storage, "chatloop_bench_tg") as url:
        return await _core_only_on(url, storage, users, per_user, tokenizer)


async def _core_only_on(db_url: str, storage: str, users: int, per_user: int,
                        tokenizer: Any) -> dict[str, Any]:
    """The same load straight into the conversation core (no Telegram): the baseline."""
    engine = make_engine(db_url)
    core = _core(engine, tokenizer)
    times: list[float] = []

    async def user(u: int) -> None:
        for i in range(per_user):
            msg = InboundMessage(channel="bench", event_id=f"{u}-{i}", chat_id=str(u),
                                 user_id=str(u), text=f"question {i} from {u}")
            t = time.perf_counter()
            await core.handle(msg, RecordingSink())
            times.append((time.perf_counter() - t) * 1000)

    await user(-1)  # warm-up
    times.clear()
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(user(u) for u in range(users)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await engine.dispose()
    return {"mode": "core only", "storage": storage, "updates": users * per_user,
            "answered": len(times), "updates/s": len(times) / elapsed,
            "p50 ms": median(times), "p99 ms": pct(times, 99),
            "gateway CPU ms /update": cpu * 1000 / len(times)}


def _core(engine: Any, tokenizer: Any) -> ConversationCore:
    return ConversationCore(
        sessions=session_factory(engine), backend=ScriptedBackend(),
        fitter=PromptFitter(tokenizer, context_tokens=2048, max_tokens=32),
        system_prompt="Be brief.",
        limits=CoreLimits(max_tokens=32, rate_limit_per_minute=10**6),
    )


async def _until(client: httpx.AsyncClient, answers: int, deadline_s: float) -> None:
    """Wait until the fake has seen `answers` final answers (or the deadline passes)."""
    deadline = time.perf_counter() + deadline_s
    while time.perf_counter() < deadline:
        if (await client.get("/_fake/stats?brief")).json()["answered"] >= answers:
            return
        await asyncio.sleep(0.1)


async def _median_run(repeat: int, run: Callable[[], Awaitable[dict[str, Any]]]
                      ) -> dict[str, Any]:
    """Run `repeat` times; the run with the median updates/s, with every run's rate beside it."""
    runs = [await run() for _ in range(repeat)]
    runs.sort(key=lambda r: r["updates/s"])
    return {**runs[len(runs) // 2], "runs updates/s": [round(r["updates/s"], 1) for r in runs]}


async def main(users: int, per_user: int, storages: list[str], modes: list[str],
               deadline_s: float, repeat: int, sends_per_s: float) -> None:
    from transformers import AutoTokenizer

    logging.basicConfig(level=logging.ERROR)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    results = []
    for storage in storages:
        for mode in modes:
            results.append(await _median_run(repeat, partial(
                _run, mode, storage, users, per_user, tokenizer, deadline_s, sends_per_s)))
        results.append(await _median_run(repeat, partial(
            _core_only, storage, users, per_user, tokenizer)))
        for mode in modes:  # light load: latency without queueing
            light = await _run(mode, storage, LIGHT_USERS, 10, tokenizer, deadline_s,
                               sends_per_s)
            results.append({**light, "mode": f"{mode}, {LIGHT_USERS} users"})
    rows = [{k: r.get(k, "") for k in results[0] if k != "methods"} for r in results]
    print_table(f"telegram gateway: {users} users x {per_user} messages, instant model, "
                f"send budget {sends_per_s:g}/s", rows)
    write_json("telegram", {"users": users, "per_user": per_user, "sends_per_s": sends_per_s,
                            "results": results,
                            "note": "latency = update available at the fake Bot API -> final "
                                    "answer received by it; includes the fake's own handling"})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--per-user", type=int, default=5)
    ap.add_argument("--storage", action="append", choices=["sqlite", "postgres"])
    ap.add_argument("--mode", action="append", choices=["polling", "webhook"],
                    help="the gateway's intake (both unless given); core only always runs")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds per run, at most")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per heavy configuration; the median run is reported")
    ap.add_argument("--sends-per-s", type=float, default=LIFTED_BUDGET,
                    help="the bot's send budget (CHATLOOP_TELEGRAM_SENDS_PER_S; default 20, "
                         "Telegram's limit for most bots): the gateway's own capacity is "
                         "measured above it, as for a bot with paid broadcasts")
    a = ap.parse_args()
    asyncio.run(main(a.users, a.per_user, a.storage or ["sqlite", "postgres"],
                     a.mode or ["polling", "webhook"], a.deadline, a.repeat, a.sends_per_s))
