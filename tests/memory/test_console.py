"""The console's answer-memory page: entries with their use count and trusted votes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from storage import memory as store
from tests.console.conftest import add_operators, build_console, console_app, sign_in
from tests.fakes.sinks import RecordingSink
from tests.memory.conftest import make_core, make_memory, message
from tests.memory.test_turns import ANSWER, PARAPHRASE, ask_until, corrected


async def test_the_memory_page_lists_entries_with_uses_and_votes(  # type: ignore[no-untyped-def]
        sessions: Any, tmp_path: Path, tokenizer, embedder) -> None:
    core = make_core(sessions, tokenizer, make_memory(sessions, embedder))
    entry = await corrected(core, sessions)
    used, _ = await ask_until(core, PARAPHRASE, channel="telegram", user="444")
    await core.vote(answer_id=used.answer_id, voter_id="telegram:900", rating=1,
                    source="telegram")
    await core.handle(message("slack", "T0/U1", "hello", "s-h"), RecordingSink())
    # a reviewer's answer that echoes the asker's number: listed, marked, never served
    asked = await core.handle(message("telegram", "555", "Call me on 07700 900123 please",
                                      "t-call"), RecordingSink())
    echoed = await core.correct(answer_id=asked.answer_id, voter_id="telegram:900",
                                text="We will call you on 07700 900123 today.",
                                source="telegram")
    async with sessions() as s:
        stats, unserved = await store.entries(s)
    assert (stats.id, stats.uses, stats.up, stats.down) == (entry, 1, 1, 0)
    assert unserved.answer == "We will call you on 07700 900123 today." and echoed.id

    await add_operators(sessions)
    app = console_app(build_console(sessions, tmp_path))
    transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://console.test") as c:
        assert (await c.get("/console/memory")).status_code == 303  # signed out
        await sign_in(c, "rob")  # a reviewer may look
        page = await c.get("/console/memory")
    assert page.status_code == 200
    row = page.text[page.text.index(f"<tr><td>{entry}</td>"):]
    row = row[:row.index("</tr>")]
    assert "<td>active</td><td>1</td><td>1</td><td>0</td>" in row
    assert ANSWER in row and "How long do I have to return something?" in row
    marked = page.text[page.text.index(f"<tr><td>{unserved.id}</td>"):]
    assert marked.startswith(f"<tr><td>{unserved.id}</td><td>active (not served: repeats the "
                             "asker's details)</td>")
    assert "not served" not in row
