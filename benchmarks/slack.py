"""Slack gateway under load: signed events at a rising rate, answers that take 2 s each.

    .venv/bin/python benchmarks/slack.py [--rates 10,25,50,100,200] [--step 4] [--db postgres]

One gateway process (uvicorn, the real Slack channel, a scripted backend taking 2 s per
answer, the real tokenizer when the bundled model is prepared) and, in this process, the
fake Slack Web API plus an open-loop sender posting signed `app_mention` events at each
rate for `--step` seconds; 10 % of events are posted again as Slack retries
(`X-Slack-Retry-Num: 1`). Then a closed-loop burst (64 senders) measures how many events
per second one gateway accepts. Reports acknowledgement latency p50/p99 per rate (goal:
p99 < 50 ms; Slack allows 3 s), events lost or answered twice, Web API calls per answer,
and the gateway's CPU time per event (acknowledgement and answer; independent of other load).
Loopback only; bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from benchmarks._common import (  # noqa: E402
    MODEL_DIR,
    fresh_database,
    pct,
    print_table,
    process_cpu_s,
    write_json,
)
from storage.db import make_engine, session_factory  # noqa: E402
from storage.models import Message  # noqa: E402
from tests.fakes.slack_api import FakeSlack  # noqa: E402
from tests.slack import gateway_proc  # noqa: E402
from tests.slack.conftest import sign  # noqa: E402

ANSWER_S = 2.0
RETRY_SHARE = 0.10


def _event(n: int, run: str) -> dict[str, Any]:
    ts = f"{1735700000 + n}.{n % 1_000_000:06d}"
    return {"token": "t", "team_id": "T111", "api_app_id": "A111", "type": "event_callback",
            "event_id": f"Ev{run}{n:06d}", "event_time": 1735700000 + n,
            "authorizations": [{"team_id": "T111", "user_id": "U0BOT", "is_bot": True}],
            "event": {"type": "app_mention", "user": f"U{n:06d}", "channel": f"C{n % 40:03d}",
                      "text": f"<@U0BOT> question number {n}", "ts": ts, "event_ts": ts,
                      "team": "T111"}}


class Sender:
    """Posts signed events and records each acknowledgement's latency and status."""

    def __init__(self, http: httpx.AsyncClient, run: str) -> None:
        self.http, self.run = http, run
        self.sent: dict[str, tuple[str, str]] = {}  # event_id -> (channel, thread_ts)
        self.statuses: Counter[int] = Counter()

    async def post(self, n: int, *, retry: bool = False) -> float:
        body = _event(n, self.run)
        raw = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **sign(raw)}
        if retry:
            headers |= {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
        started = time.perf_counter()
        try:
            status = (await self.http.post("/slack/events", content=raw, headers=headers)
                      ).status_code
        except httpx.HTTPError:
            status = 0
        latency = (time.perf_counter() - started) * 1000
        self.statuses[status] += 1
        if status == 200:
            self.sent[body["event_id"]] = (body["event"]["channel"], body["event"]["ts"])
        return latency


async def _open_loop(sender: Sender, rate: float, seconds: float, first: int) -> dict[str, Any]:
    """Post at a fixed rate whatever the answers' speed; retries are posted 50 ms later."""
    count = int(rate * seconds)
    latencies: list[float] = []

    async def one(i: int) -> None:
        await asyncio.sleep(i / rate)
        latencies.append(await sender.post(first + i))
        if random.random() < RETRY_SHARE:
            await asyncio.sleep(0.05)
            latencies.append(await sender.post(first + i, retry=True))

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = time.perf_counter() - started
    return {"offered_ev_s": rate, "events": count, "requests": len(latencies),
            "accepted_ev_s": round(count / elapsed, 1),
            "ack_p50_ms": pct(latencies, 50), "ack_p99_ms": pct(latencies, 99),
            "ack_max_ms": max(latencies)}


async def _burst(sender: Sender, seconds: float, first: int, workers: int = 64) -> dict[str, Any]:
    """Closed loop: `workers` senders post back to back; the gateway's acceptance rate."""
    latencies: list[float] = []
    counter = iter(range(first, first + 1_000_000))
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            latencies.append(await sender.post(next(counter)))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.perf_counter() - started
    return {"offered_ev_s": f"burst x{workers}", "events": len(latencies),
            "requests": len(latencies), "accepted_ev_s": round(len(latencies) / elapsed, 1),
            "ack_p50_ms": pct(latencies, 50), "ack_p99_ms": pct(latencies, 99),
            "ack_max_ms": max(latencies)}


async def _gateway(db_url: str, fake: FakeSlack,
                   concurrency: int) -> tuple[asyncio.subprocess.Process, str]:
    args = ["--seconds", str(ANSWER_S), "--concurrency", str(concurrency)]
    if (MODEL_DIR / "tokenizer.json").exists():
        args += ["--tokenizer", str(MODEL_DIR)]
    return await gateway_proc.start(db_url, fake.url, *args, timeout_s=120)


async def _count_answers(db_url: str) -> int:
    engine = make_engine(db_url)
    try:
        async with session_factory(engine)() as s:
            stmt = select(func.count()).select_from(Message).where(Message.role == "assistant")
            return int((await s.execute(stmt)).scalar_one())
    finally:
        await engine.dispose()


async def run(rates: list[float], step: float, db_kind: str, drain_s: float,
              concurrency: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    async with fresh_database(db_kind, "chatloop_bench_slack") as db_url:
        async with FakeSlack().serve() as fake:
            proc, url = await _gateway(db_url, fake, concurrency)
            try:
                limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
                async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
                    sender = Sender(http, uuid.uuid4().hex[:6])
                    first = 0
                    cpu = process_cpu_s(proc.pid)
                    for rate in rates:
                        rows.append(await _open_loop(sender, rate, step, first))
                        first += int(rate * step)
                    rows.append(await _burst(sender, step, first))
                    threads = set(sender.sent.values())
                    answered = await _wait_answers(fake, threads, drain_s)
                    cpu_ms_per_event = (process_cpu_s(proc.pid) - cpu) * 1000 / max(1, len(threads))
            finally:
                proc.terminate()
                await proc.wait()
            answers_stored = await _count_answers(db_url)
            calls = Counter(c.method for c in fake.calls if c.method != "auth.test")
    per_thread = Counter((m.channel, m.thread_ts) for m in answered)
    summary = {
        "events_accepted": len(threads), "answered": len(per_thread),
        "lost": len(threads - set(per_thread)),
        "doubled": sum(1 for n in per_thread.values() if n > 1),
        "answers_stored": answers_stored, "non_200": sum(
            n for status, n in sender.statuses.items() if status != 200),
        "gateway_cpu_ms_per_event": round(cpu_ms_per_event, 1),
        "web_api_calls_per_answer": round(sum(calls.values()) / max(1, len(per_thread)), 2),
        "calls_by_method": dict(calls),
    }
    return {"rows": rows, "summary": summary}


async def _wait_answers(fake: FakeSlack, threads: set[tuple[str, str]], drain_s: float) -> list:
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline:
        done = [m for m in fake.messages.values() if m.feedback]
        if len({(m.channel, m.thread_ts) for m in done}) >= len(threads):
            break
        await asyncio.sleep(0.25)
    await asyncio.sleep(1.0)  # let a double, if any, arrive
    return [m for m in fake.messages.values() if m.feedback and (m.channel, m.thread_ts) in threads]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rates", default="10,25,50,100,200")
    p.add_argument("--step", type=float, default=4.0, help="seconds per rate")
    p.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    p.add_argument("--drain", type=float, default=120.0, help="max seconds to wait for answers")
    p.add_argument("--concurrency", type=int, default=32,
                   help="CHATLOOP_MAX_CONCURRENT_GENERATIONS (Slack answers in flight: twice that)")
    args = p.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    result = asyncio.run(run(rates, args.step, args.db, args.drain, args.concurrency))
    print_table(f"Slack acknowledgements ({args.db}, answers take {ANSWER_S:.0f} s)",
                result["rows"])
    s = result["summary"]
    print_table("Delivery", [{k: v for k, v in s.items() if k != "calls_by_method"}])
    print_table("Web API calls", [s["calls_by_method"]])
    write_json(f"slack_{args.db}", {"answer_seconds": ANSWER_S, "db": args.db,
                                    "concurrency": args.concurrency, **result})


if __name__ == "__main__":
    main()
