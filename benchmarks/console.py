"""Operator console page times on a large PostgreSQL database.

    .venv/bin/python benchmarks/console.py [--conversations 100000] [--messages-per 10] [--n 30]

Generates 100,000 conversations and 1,000,000 messages (questions and answers over 90 days,
three channels, three adapters, ~2 % failed answers), 200,000 votes, 2,000 pending and
1,000 approved corrections into a new PostgreSQL database (bulk INSERT ... SELECT
generate_series, then ANALYZE), which it drops afterwards. Then, signed in as an operator,
it requests each page `--n` times through the gateway app (in-process ASGI: the app's own
time, no network) and reports p50 / p95: the review queue, conversation search (by text,
by person, filtered by channel and rating) and the quality dashboard (14 days). The
sign-in page, which reads no data, is the same-run baseline. Goal: p95 under 300 ms each.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import fresh_database, median, pct, print_table, write_json  # noqa: E402

GENERATE = [
    """INSERT INTO conversation (id, channel, external_chat_id, external_thread_id, epoch,
                                 created_at)
       SELECT g, (ARRAY['telegram','slack','web'])[1 + g % 3], 'chat' || g, '', 0,
              now() - interval '90 days' + (g * interval '90 days') / :conversations
       FROM generate_series(1, :conversations) g""",
    # message i (1-based) of conversation c = (i - 1) / per + 1: odd ones questions,
    # even ones the answers to the message before
    """INSERT INTO message (id, conversation_id, role, text, author_id, reply_to_id,
                            created_at, model, adapter, prompt_tokens, completion_tokens,
                            ttft_ms, latency_ms, finish_reason, status, error_kind)
       SELECT i, c, CASE WHEN i % 2 = 1 THEN 'user' ELSE 'assistant' END,
              CASE WHEN i % 2 = 1
                   THEN (ARRAY['When do you open on ','How do I reset my password for ',
                               'Do you ship to ','What is the refund policy for ',
                               'Can I change my order ','Where is my parcel number '])
                        [1 + (i / 2) % 6] || md5(i::text)
                   ELSE 'Our team answers within a day; reference ' || md5(i::text) END,
              CASE WHEN i % 2 = 1 THEN
                   (ARRAY['telegram','slack','web'])[1 + c % 3] || ':' || (c % 20000) END,
              CASE WHEN i % 2 = 0 THEN i - 1 END,
              now() - interval '90 days' + (c * interval '90 days') / :conversations
                    + (i % :per) * interval '20 seconds',
              CASE WHEN i % 2 = 0 THEN 'chatloop-base' END,
              CASE WHEN i % 2 = 0 THEN
                   (ARRAY[NULL, 'chatloop-v7', 'chatloop-v8'])[1 + (c / 7) % 3] END,
              CASE WHEN i % 2 = 0 THEN 200 + i % 300 END,
              CASE WHEN i % 2 = 0 THEN 40 + i % 80 END,
              CASE WHEN i % 2 = 0 THEN 80 + (i % 97) * 3.1 END,
              CASE WHEN i % 2 = 0 THEN 600 + (i % 89) * 21.0 END,
              CASE WHEN i % 2 = 0 THEN 'stop' END,
              CASE WHEN i % 2 = 0 THEN CASE WHEN i % 50 = 0 THEN 'failed' ELSE 'ok' END END,
              CASE WHEN i % 2 = 0 AND i % 50 = 0 THEN
                   (ARRAY['timeout','unavailable','gave_up'])[1 + (i / 50) % 3] END
       FROM (SELECT i, (i - 1) / :per + 1 AS c
             FROM generate_series(1, :conversations * :per) i) s""",
    # votes on 2 answers in 10, by the asker
    """INSERT INTO feedback (answer_id, voter_id, rating, source, trusted, created_at,
                             updated_at, revision)
       SELECT m.id, 'voter:' || (m.id % 50000), CASE WHEN m.id % 7 = 0 THEN -1 ELSE 1 END,
              'telegram', false, m.created_at, m.created_at, 1
       FROM message m WHERE m.role = 'assistant' AND m.id % 10 IN (2, 6)
         AND m.status = 'ok'""",
    # corrections: 2,000 pending, 1,000 approved
    """INSERT INTO feedback (answer_id, voter_id, correction, source, trusted, review_status,
                             created_at, updated_at, revision)
       SELECT m.id, 'fixer:' || (m.id % 977), 'A better answer ' || md5(m.id::text),
              'slack', false, CASE WHEN n <= 2000 THEN 'pending' ELSE 'approved' END,
              m.created_at, m.created_at, 1
       FROM (SELECT id, created_at, row_number() OVER (ORDER BY id) AS n FROM message
             WHERE role = 'assistant' AND id % 10 = 4 AND id % 31 = 0) m
       WHERE n <= 3000""",
]


async def generate(url: str, conversations: int, per: int) -> float:
    import asyncpg

    started = time.perf_counter()
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        for sql in GENERATE:
            sql = (sql.replace(":conversations", str(conversations))
                   .replace(":per", str(per)))
            await conn.execute(sql)
        for table in ("conversation", "message", "feedback"):
            await conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                               f"(SELECT max(id) FROM {table}))")
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def measure(url: str, n: int) -> list[dict[str, Any]]:
    import httpx

    from bots.gateway import create_app
    from chatloop.console import build_console
    from chatloop.settings import Settings
    from feedback.canary import CanaryPolicy
    from feedback.policy import DatasetPolicy
    from storage import operators
    from storage.db import make_engine, session_factory

    engine = make_engine(url)
    sessions = session_factory(engine)
    async with sessions() as s:
        await operators.add_operator(s, name="bench", role="admin", password="bench-password")
    settings = Settings(_env_file=None, storage={"database_url": url})
    console = build_console(settings, sessions, canary_policy=CanaryPolicy(),
                            rules=DatasetPolicy())

    async def ready() -> dict[str, str]:
        return {}

    app = create_app(channels=[console], ready=ready)
    pages = {
        "sign-in page (baseline, no data)": "/console/login",
        "review queue": "/console/review",
        "review queue, one channel": "/console/review?channel=slack",
        "search: text": "/console/conversations?q=parcel+number+3f",
        "search: person": "/console/conversations?person=telegram:1234",
        "search: channel + 👎": "/console/conversations?channel=web&rating=down",
        "search: adapter + date": "/console/conversations?adapter=chatloop-v8"
                                  "&since=2026-10-01&until=2026-10-15",
        "conversation list": "/console/conversations",
        "quality dashboard (14 days)": "/console/quality",
        "thread view": "/console/conversations/5432",
    }
    rows = []
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as c:
        page = await c.get("/console/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        r = await c.post("/console/login", data={"csrf": token.group(1), "name": "bench",
                                                 "password": "bench-password"})
        assert r.status_code == 303, r.text
        for name, path in pages.items():
            await c.get(path)  # warm
            times = []
            for _ in range(n):
                started = time.perf_counter()
                r = await c.get(path)
                times.append((time.perf_counter() - started) * 1000)
                assert r.status_code == 200, (path, r.status_code, r.text[:300])
            rows.append({"page": name, "path": path, "n": n, "p50_ms": round(median(times), 1),
                         "p95_ms": round(pct(times, 95), 1),
                         "goal": "-" if "baseline" in name else
                         ("ok" if pct(times, 95) < 300 else "over 300 ms")})
    await engine.dispose()
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--messages-per", type=int, default=10)
    parser.add_argument("--n", type=int, default=30)
    args = parser.parse_args()
    async with fresh_database("postgres", "chatloop_bench_console") as url:
        url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
        took = await generate(url, args.conversations, args.messages_per)
        print(f"generated {args.conversations:,} conversations, "
              f"{args.conversations * args.messages_per:,} messages in {took:.0f} s")
        rows = await measure(url, args.n)
    print_table("console page times (PostgreSQL, in-process ASGI)", rows)
    write_json("console", {"conversations": args.conversations,
                           "messages": args.conversations * args.messages_per,
                           "generate_s": round(took, 1), "rows": rows})


if __name__ == "__main__":
    asyncio.run(main())
