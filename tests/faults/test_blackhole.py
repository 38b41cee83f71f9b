"""The database host stops answering (a proxy drops every packet): turns fail within the
configured timeouts, nothing hangs, no log line carries the user's text, and once the host
answers again turns work."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from sqlalchemy.engine import make_url
from transformers import AutoTokenizer

from bots.core import InboundMessage, Outcome
from storage.db import make_engine, session_factory
from tests.fakes.inference import ScriptedBackend
from tests.fakes.sinks import RecordingSink
from tests.faults.proxy import BlackholeProxy
from tests.telegram.conftest import make_core

pytestmark = [pytest.mark.postgres, pytest.mark.faults]
SECRET_TEXT = "my card number is 4111-1111-1111-1111"
TIMEOUT_S = 2.0


def _msg(n: int, text: str) -> InboundMessage:
    return InboundMessage(channel="telegram", event_id=f"bh{n}", chat_id="77", user_id="77",
                          text=text, message_id=str(n))


async def test_a_silent_database_host_fails_turns_in_time(pg_db, model_dir, caplog,
                                                          tally) -> None:  # type: ignore[no-untyped-def]
    url = make_url(pg_db)
    async with BlackholeProxy(url.host or "127.0.0.1", url.port or 5432).serve() as proxy:
        engine = make_engine(url.set(port=proxy.port).render_as_string(hide_password=False),
                             command_timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S,
                             idle_ping_s=0.0)
        core = make_core(session_factory(engine), AutoTokenizer.from_pretrained(model_dir),
                         ScriptedBackend())
        try:
            assert (await core.handle(_msg(1, "hello"), RecordingSink())).outcome \
                == Outcome.ANSWERED
            proxy.dropping = True
            tally.inject(f"database host silent (packets dropped), timeouts {TIMEOUT_S} s")
            caplog.set_level(logging.DEBUG)
            began = time.monotonic()
            with pytest.raises(Exception):  # noqa: B017 - any error, as long as it is in time
                await asyncio.wait_for(core.handle(_msg(2, SECRET_TEXT), RecordingSink()), 30)
            failed_after = time.monotonic() - began
            logged = "\n".join(r.getMessage() + (logging.Formatter().formatException(r.exc_info)
                                                 if r.exc_info else "")
                               for r in caplog.records)
            proxy.dropping = False
            tally.inject("host answering again")
            deadline = time.monotonic() + 30
            while True:  # the pool replaces the connections that went silent
                try:
                    result = await core.handle(_msg(3, "back?"), RecordingSink())
                    break
                except Exception:
                    assert time.monotonic() < deadline, "turns never worked again"
                    await asyncio.sleep(0.5)
        finally:
            await core.aclose()
            await engine.dispose()
    tally.count(failed_after_s=round(failed_after, 1), text_in_logs=SECRET_TEXT in logged,
                after=result.outcome.value)
    assert failed_after < 4 * TIMEOUT_S
    assert SECRET_TEXT not in logged and "4111" not in logged
    assert result.outcome == Outcome.ANSWERED
