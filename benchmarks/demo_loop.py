"""How long until a newcomer sees the demo learn?

Starts `chatloop demo` (SQLite, the bundled model in the embedded engine, the learning loop
with the demo's thresholds) on a fresh database, and acts as the person at the browser: asks
the synthetic company's questions in the web chat (each in its own tab, or all in one with
--one-chat), answers each with 👎 and the company's
answer as a correction (trusted: the demo's user is the local operator), then keeps asking
other phrasings of the same questions until an answer says it came from a trained adapter.

Reports the time from the last correction to the first adapter answer (the issue's goal:
about ten minutes on two CPU cores) and token-F1 of the answers to the other phrasings before
and after. The answer memory is off unless --memory: an approved answer sent back as it is
would hide which adapter answered. Usage: .venv/bin/python benchmarks/demo_loop.py
[--corrections 6] [--deadline 1500] [--one-chat] [--memory]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import ROOT, median, print_table, write_json  # noqa: E402
from feedback.evaluate import token_f1  # noqa: E402

COMPANY = json.loads((ROOT / "feedback/data/company.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ask(client: httpx.Client, text: str, chat: str = "probe") -> dict[str, object]:
    """One web chat turn: the final answer, its id and the adapter that answered."""
    body = {"event_id": f"ev-{time.monotonic_ns()}", "chat_id": chat, "text": text}
    out: dict[str, object] = {}
    with client.stream("POST", "/api/chat", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            event = json.loads(line) if line else {}
            if event.get("type") == "route":
                out["adapter"] = event["adapter"]
            elif event.get("type") == "done":
                out.update(text=event["text"], answer_id=event["answer_id"])
    return out


def probe_f1(client: httpx.Client, intents: list[dict]) -> tuple[float, set[object]]:
    """Median token-F1 of answers to phrasings never corrected, and the routes that answered."""
    scores, routes = [], set()
    for intent in intents:
        got = ask(client, intent["questions"][-1])
        scores.append(token_f1(str(got.get("text", "")), intent["answer"]))
        routes.add(got.get("adapter"))
    return median(scores), routes


def main(corrections: int, deadline_s: float, one_chat: bool, memory: bool) -> None:
    intents = COMPANY["intents"][:corrections]
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="chatloop-demo-") as tmp:
        env = {**os.environ, "CHATLOOP_PORT": str(port),
               "CHATLOOP_DATABASE_URL": f"sqlite:///{tmp}/demo.db",
               "CHATLOOP_ADAPTERS_DIR": f"{tmp}/adapters", "CHATLOOP_LEARN_RUNS_DIR": f"{tmp}/runs",
               "CHATLOOP_MEMORY_ENABLED": str(memory).lower(),
               "CHATLOOP_METRICS_PORT": "0"}
        log = Path(tmp) / "demo.log"
        chatloop = str(Path(sys.executable).parent / "chatloop")
        with log.open("wb") as out:
            proc = subprocess.Popen([chatloop, "demo"], cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        try:
            result = drive(f"http://127.0.0.1:{port}", intents, deadline_s, one_chat)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        if result.get("adapter") is None:
            print(log.read_text()[-4000:])
    rows = [{"corrections": corrections, "chats": "one" if one_chat else "one per question",
             "memory": "on" if memory else "off",
             "first correction → adapter answer s": result.get("to_adapter_s"),
             "last correction → adapter answer s": result.get("after_last_s"),
             "adapter": result.get("adapter"),
             "token-F1 other phrasings, base → adapter":
                 f"{result['f1_before']:.3f} → {result.get('f1_after', float('nan')):.3f}"}]
    print_table("chatloop demo: corrections in the web chat until a trained adapter answers", rows)
    write_json("demo_loop", {"rows": rows, **result})


def drive(base: str, intents: list[dict], deadline_s: float,
          one_chat: bool) -> dict[str, object]:
    with httpx.Client(base_url=base, timeout=600) as client:
        started = time.monotonic()
        while True:  # the demo prepares the model and migrates first
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > 300:
                raise RuntimeError("chatloop demo did not start in 300 s")
            time.sleep(1)
        client.get("/chat")  # the browser's identity cookie
        f1_before, _ = probe_f1(client, intents)
        first = None
        for i, intent in enumerate(intents):  # each question in its own tab, or all in one
            got = ask(client, intent["questions"][0], "chat" if one_chat else f"chat{i}")
            client.post("/api/vote", json={"answer_id": got["answer_id"], "rating": -1})
            r = client.post("/api/correction",
                            json={"answer_id": got["answer_id"], "text": intent["answer"]})
            assert r.json()["review_status"] == "approved", r.json()
            first = first or time.monotonic()
        last = time.monotonic()
        result: dict[str, object] = {"f1_before": f1_before}
        while time.monotonic() - last < deadline_s:
            got = ask(client, intents[0]["questions"][-1])
            if got.get("adapter"):
                now = time.monotonic()
                f1_after, routes = probe_f1(client, intents)
                result.update(adapter=got["adapter"], to_adapter_s=round(now - first, 1),
                              after_last_s=round(now - last, 1), f1_after=f1_after,
                              routes=sorted(str(r) for r in routes))
                break
            time.sleep(10)
        return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corrections", type=int, default=6)
    ap.add_argument("--deadline", type=float, default=1500.0,
                    help="seconds to wait for an adapter answer after the last correction")
    ap.add_argument("--one-chat", action="store_true",
                    help="ask every question in one conversation (one browser tab)")
    ap.add_argument("--memory", action="store_true", help="keep the answer memory on")
    args = ap.parse_args()
    main(args.corrections, args.deadline, args.one_chat, args.memory)
