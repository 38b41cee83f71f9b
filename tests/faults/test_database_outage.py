"""PostgreSQL stopped while messages arrive, then started: every message answered once.

Telegram polling (updates stay unconfirmed until recorded), Telegram webhook (5xx, Telegram
delivers again) and the Slack Events API (5xx, Slack retries). The outage lasts OUTAGE_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from typing import Any

import pytest
from transformers import AutoTokenizer

from bots.telegram import TelegramChannel, TelegramOptions, make_bot
from bots.telegram.outbound import RetryPolicy
from tests.fakes.inference import ScriptedBackend
from tests.fakes.servers import serve_app
from tests.fakes.slack_api import FakeSlack
from tests.fakes.telegram_api import TOKEN, FakeTelegram
from tests.faults.conftest import OUTAGE_S, Tally
from tests.faults.pgserver import OwnPostgres
from tests.slack.conftest import payload, sign
from tests.slack.gateway_proc import scripted, slack_settings
from tests.telegram.conftest import FAST, eventually, make_core
from tests.telegram.test_webhook import gateway as webhook_gateway

pytestmark = [pytest.mark.postgres, pytest.mark.faults]
MESSAGES = 20


def _telegram_answers(fake: FakeTelegram, chats: list[dict[str, Any]]) -> Counter[str]:
    return Counter(m["text"] for c in chats for m in fake.answers(c["id"]))


async def _outage(pg: OwnPostgres, tally: Tally, during: Any) -> None:
    """Stop the database, run `during()` (messages arriving), keep it away OUTAGE_S, start it."""
    pg.stop()
    began = time.monotonic()
    tally.inject(f"PostgreSQL stopped for {OUTAGE_S:.0f} s")
    await during()
    await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - began)))  # the outage itself
    pg.start()


async def test_polling_survives_a_database_outage(own_pg, pg_db, pg_sessions, model_dir,
                                                  tally) -> None:  # type: ignore[no-untyped-def]
    fake = FakeTelegram()
    async with serve_app(fake.app()) as url:
        # the default rate limit: retried deliveries must not count against it
        core = make_core(pg_sessions, AutoTokenizer.from_pretrained(model_dir), ScriptedBackend())
        channel = TelegramChannel(core=core, bot=make_bot(TOKEN, api_base=url),
                                  options=TelegramOptions(**FAST),
                                  retry=RetryPolicy(backoff_s=0.05, max_backoff_s=0.2))
        await channel.start()
        chats = [fake.private(1000 + i, f"user{i}") for i in range(5)]
        try:
            async def arrive() -> None:
                for n in range(MESSAGES):
                    fake.say(chats[n % len(chats)], f"q{n}")
                    await asyncio.sleep(OUTAGE_S / 2 / MESSAGES)

            await _outage(own_pg, tally, arrive)
            tally.inject(f"{MESSAGES} Telegram messages (polling) during it")
            with contextlib.suppress(AssertionError):  # counted below
                await eventually(lambda: sum(_telegram_answers(fake, chats).values()) >= MESSAGES,
                                 within=60)
                await eventually(lambda: not fake.updates, within=20)  # all confirmed
            await asyncio.sleep(0.5)  # a doubled answer would show by now
        finally:
            fake.release_pollers()
            await channel.stop()
            await core.aclose()
    got = _telegram_answers(fake, chats)
    tally.count(answers=sum(got.values()), confirmed_all=not fake.updates)
    tally.messages({f"Echo: q{n}": 1 for n in range(MESSAGES)}, dict(got))
    assert tally.lost == 0 and tally.doubled == 0


async def test_webhook_survives_a_database_outage(own_pg, pg_db, model_dir,
                                                  tally) -> None:  # type: ignore[no-untyped-def]
    fake = FakeTelegram()
    fake.webhook_attempts, fake.webhook_retry_s = 1000, 0.5  # Telegram keeps trying a while
    async with serve_app(fake.app()) as base:
        fake.base_url = base  # type: ignore[attr-defined]
        async with webhook_gateway(fake, pg_db, model_dir):
            chats = [fake.private(2000 + i, f"user{i}") for i in range(5)]

            async def arrive() -> None:
                for n in range(MESSAGES):
                    fake.say(chats[n % len(chats)], f"w{n}")

            await _outage(own_pg, tally, arrive)
            tally.inject(f"{MESSAGES} Telegram messages (webhook) during it")
            with contextlib.suppress(AssertionError):  # counted below
                await eventually(lambda: sum(_telegram_answers(fake, chats).values()) >= MESSAGES,
                                 within=60)
            await asyncio.sleep(0.5)
        statuses = Counter(fake.webhook_statuses)
    got = _telegram_answers(fake, chats)
    tally.count(answers=sum(got.values()),
                webhook_5xx=sum(n for s, n in statuses.items() if s >= 500),
                webhook_2xx=statuses[200], webhook_other=sum(
                    n for s, n in statuses.items() if s < 500 and s != 200))
    tally.messages({f"Echo: w{n}": 1 for n in range(MESSAGES)}, dict(got))
    assert tally.lost == 0 and tally.doubled == 0
    assert statuses[200] == MESSAGES and all(s == 200 or s >= 500 for s in statuses)


async def test_slack_answers_5xx_while_it_cannot_record(own_pg, pg_db,
                                                        tally) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from chatloop.app import build_app, build_services

    async with FakeSlack().serve() as fake:
        # 60 tries from one user, 20 recorded: only the recorded ones count against the limit
        services = await build_services(slack_settings(pg_db, fake.url, rate_limit_per_minute=30),
                                        backend=scripted())
        async with serve_app(build_app(services, webchat=False)) as url, \
                httpx.AsyncClient(base_url=url, timeout=30) as http:
            bodies = []
            for n in range(MESSAGES):
                body = payload("app_mention", text=f"<@U0BOT> s{n}", ts=f"1700000{n:03d}.000100")
                body["event_id"] = f"Ev{n:04d}FAULT"
                bodies.append(body)

            async def post(body: dict[str, Any], retry: int) -> int:
                raw = httpx.Request("POST", "/", json=body).content
                h = {"Content-Type": "application/json", **sign(raw)}
                if retry:
                    h |= {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_error"}
                return (await http.post("/slack/events", content=raw, headers=h)).status_code

            during: list[int] = []

            async def arrive() -> None:  # Slack's first try, and its immediate retry
                for body in bodies:
                    during.append(await post(body, 0))
                    during.append(await post(body, 1))

            await _outage(own_pg, tally, arrive)
            tally.inject(f"{MESSAGES} Slack events (two tries each) during it")
            # Slack's next retry (a minute later in production; once the database is back)
            after = [await post(body, 2) for body in bodies]
            with contextlib.suppress(TimeoutError):  # counted below
                await fake.wait_for(lambda: sum(_slack_answers(fake).values()) >= MESSAGES,
                                    within=60)
            await services.channels["slack"].idle()  # type: ignore[attr-defined]
            await asyncio.sleep(0.5)
        await services.aclose()
        finals = _slack_answers(fake)
    tally.count(during=dict(Counter(during)), after=dict(Counter(after)))
    tally.messages({f"s{n}": 1 for n in range(MESSAGES)}, dict(finals))
    assert all(s >= 500 for s in during), during
    assert all(s == 200 for s in after), after
    assert tally.lost == 0 and tally.doubled == 0


def _slack_answers(fake: FakeSlack) -> Counter[str]:
    """Answers (messages with the feedback buttons) by the question they answer."""
    return Counter(m.group(0) for p in fake.messages.values() if p.feedback
                   if (m := re.search(r"\bs\d+\b", p.text)))
