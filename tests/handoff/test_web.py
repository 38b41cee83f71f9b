"""Web chat hand-off: the person asks in the web chat, an operator answers in the console's
inbox, the chat shows it (polled), hand-back; the pair is stored like any agent's reply."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx

from bots.core import ConversationCore, CoreLimits
from bots.core.handoff import HandoffPolicy
from bots.gateway import create_app
from bots.webchat import WebChat
from bots.webid import WebIdentities
from inference.prompt import PromptFitter
from storage.models import Feedback, Handoff
from tests.console.conftest import add_operators, build_console, csrf_of, sign_in
from tests.fakes.inference import ScriptedBackend
from tests.handoff.conftest import rows


async def _say(web: httpx.AsyncClient, text: str, n: list[int]) -> list[dict[str, Any]]:
    n[0] += 1
    r = await web.post("/api/chat", json={"event_id": f"e{n[0]}", "chat_id": "c1",
                                          "text": text})
    assert r.status_code == 200
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


async def test_an_operator_answers_a_web_chat_from_the_inbox(  # type: ignore[no-untyped-def]
        sessions, tokenizer, tmp_path: Path) -> None:
    backend = ScriptedBackend(answer=lambda r: "We open at nine.")
    core = ConversationCore(
        sessions=sessions, backend=backend,
        fitter=PromptFitter(tokenizer, context_tokens=2048, max_tokens=64),
        system_prompt="Be brief.", limits=CoreLimits(max_tokens=64),
        handoff=HandoffPolicy(channels=frozenset({"web"})))
    await add_operators(sessions)
    chat = WebChat(core, token=None, identities=WebIdentities("s" * 32))
    app = create_app(channels=[chat, build_console(sessions, tmp_path)],
                     ready=lambda: {"database": "ok"})  # type: ignore[arg-type, return-value]
    transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 50000))
    n = [0]
    async with httpx.AsyncClient(transport=transport, base_url="http://chat.test") as web, \
            httpx.AsyncClient(transport=transport, base_url="http://chat.test") as ops:
        events = await _say(web, "When are you open?", n)
        assert events[-1]["type"] == "done" and events[-1]["text"] == "We open at nine."
        events = await _say(web, "/human", n)
        assert any("asked for a person" in e.get("text", "") for e in events)
        assert events[-1] == {"type": "handoff"}
        asked = len(backend.requests)
        events = await _say(web, "I want a refund for order 7", n)  # for the person
        assert events == [{"type": "handoff"}] and len(backend.requests) == asked

        await sign_in(ops, "alice")
        inbox = await ops.get("/console/inbox")
        [hid] = re.findall(r'/console/inbox/(\d+)"', inbox.text)
        page = await ops.get(f"/console/inbox/{hid}")
        assert "When are you open?" in page.text and "I want a refund for order 7" in page.text
        form = {"csrf": csrf_of(page.text), "nonce": "1", "text": "Refunds take five days."}
        sent = await ops.post(f"/console/inbox/{hid}/reply", data=form)
        assert sent.status_code == 303
        await ops.post(f"/console/inbox/{hid}/reply", data=form)  # sent twice: relayed once

        polled = (await web.post("/api/handoff", json={"chat_id": "c1"})).json()
        assert polled == {"status": "held", "agent": "alice",
                          "messages": [{"text": "Refunds take five days."}]}
        assert (await web.post("/api/handoff", json={"chat_id": "c1"})).json()["messages"] == []
        [fb] = [f for f in await rows(sessions, Feedback) if f.source == "handoff"]
        assert fb.voter_id == "console:alice" and fb.trusted
        assert fb.correction == "Refunds take five days."

        page = await ops.get(f"/console/inbox/{hid}")
        done = await ops.post(f"/console/inbox/{hid}/done", data={"csrf": csrf_of(page.text)})
        assert done.status_code == 303
        assert (await web.post("/api/handoff", json={"chat_id": "c1"})).json()["status"] == \
            "closed"
        [h] = await rows(sessions, Handoff)
        assert h.closed_by == "console:alice"
        events = await _say(web, "And on Sundays?", n)  # the bot answers again
        assert events[-1]["type"] == "done" and len(backend.requests) == asked + 1
        # the quality page: one hand-off after the base model's 2 answers
        quality = await ops.get("/console/quality")
        assert re.search(r'base model</td><td class="num">2</td><td class="num">1</td>',
                         quality.text), quality.text[quality.text.find('id="handoffs"'):][:600]
        # another browser sees none of it
        async with httpx.AsyncClient(transport=transport, base_url="http://chat.test") as other:
            assert (await other.post("/api/handoff", json={"chat_id": "c1"})).json() == {
                "status": None, "agent": None, "messages": []}
