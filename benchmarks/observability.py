"""The cost of metrics, JSON logs and spans: the Telegram benchmark with telemetry off and on.

    .venv/bin/python benchmarks/observability.py [--rounds 8] [--users 200] [--per-user 5]
                                                 [--storage postgres] [--mode polling]

benchmarks/telegram.py's heavy load (200 users in private chats against the fake Bot API, an
instant scripted model, one gateway in this process) in one run: one gateway, one database,
the load sent `2 x rounds` times in windows, each on new chats, telemetry switched before
each window: off (text log lines at INFO, no metrics, no spans: the demo's default) or on
(Prometheus metrics recorded and served on a port of their own, JSON log lines at INFO with
the turn's ids and trace id: what `chatloop serve` does with `CHATLOOP_LOG_FORMAT=json` and no
OTLP endpoint, where no span is made; `--spans`: the SDK's spans made for every turn too, as
with an OTLP endpoint, but exported nowhere), in the order off/on/on/off/off/on... so that
drift on a shared machine hits both alike. Reports the median updates/s of each and their
ratio (goal: on within 3 % of off), the median ratio of neighbouring windows (one off, one
on, back to back: less moved by the machine's drift), and the gateway's CPU time per update.
The log lines go to a file under var/bench; /metrics is scraped around every window and must
count each "on" window's answered turns; nothing may be lost or doubled.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from benchmarks._common import MODEL_DIR, ROOT, median, print_table, write_json  # noqa: E402
from benchmarks.telegram import Window, _run  # noqa: E402
from chatloop import telemetry  # noqa: E402
from chatloop.telemetry import metrics  # noqa: E402
from chatloop.telemetry.logs import configure_logging  # noqa: E402
from chatloop.telemetry.tracing import make_provider  # noqa: E402
from tests.fakes.vllm_server import free_port  # noqa: E402


def switch(on: bool, log_file: Any, spans: bool = False) -> None:
    """Telemetry as `chatloop serve` sets it up with CHATLOOP_LOG_FORMAT=json (on) or text;
    `spans`: with a tracer provider, as when OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    configure_logging("json" if on else "text", stream=log_file)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # as benchmarks/telegram.py
    telemetry.configure(metrics=on, log_ids=on,
                        tracer_provider=make_provider("chatloop-bench", otlp=False)
                        if on and spans else None)


async def answered_turns(port: int) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "chatloop_turns_total" and s.labels["outcome"] == "answered")


async def main(rounds: int, users: int, per_user: int, storage: str, mode: str,
               deadline_s: float, spans: bool = False) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    log_path = ROOT / "var/bench/observability.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = metrics.serve(host="127.0.0.1", port=port)
    order = [bool((i + 1) // 2 % 2) for i in range(2 * rounds)]  # off on on off off on on ...
    counted: list[float] = []

    def window(on: bool) -> Window:
        async def begin() -> None:
            if counted:  # the window before ended: what /metrics counted in it
                counted[-1] = await answered_turns(port) - counted[-1]
            switch(on, log_file, spans)
            counted.append(await answered_turns(port))
        return begin

    try:
        with log_path.open("w") as log_file:
            result = await _run(mode, storage, users, per_user, tokenizer, deadline_s,
                                windows=[window(on) for on in order])
            counted[-1] = await answered_turns(port) - counted[-1]
    finally:
        switch(False, sys.stderr)
        if server is not None:
            server.shutdown()
    for on, n in zip(order, counted, strict=True):
        if on and n != users * per_user:
            raise SystemExit(f"/metrics counted {n} answered turns in a window of "
                             f"{users * per_user}")
    if result["lost"] or result["doubled"]:
        raise SystemExit(f"lost {result['lost']}, doubled {result['doubled']}")
    windows = list(zip(order, result["windows"], strict=True))
    rates = {flag: [w["updates/s"] for on, w in windows if on == flag] for flag in (False, True)}
    cpu = {flag: median([w["gateway CPU ms /update"] for on, w in windows if on == flag])
           for flag in (False, True)}
    off, on = median(rates[False]), median(rates[True])
    # windows 2k and 2k+1 are neighbours (one off, one on): their ratio shares the machine's
    # state of that moment
    seq = [w["updates/s"] for _, w in windows]
    pairs = [(seq[i + 1] / seq[i]) if order[i + 1] else (seq[i] / seq[i + 1])
             for i in range(0, len(seq) - 1, 2)]
    rows = [{"telemetry": name, "median updates/s": value,
             "gateway CPU ms /update": cpu[flag],
             "windows updates/s": " ".join(f"{r:.1f}" for r in rates[flag])}
            for name, flag, value in (("off", False, off), ("on", True, on))]
    rows.append({"telemetry": "on / off", "median updates/s": on / off,
                 "gateway CPU ms /update": cpu[True] / cpu[False], "windows updates/s": ""})
    rows.append({"telemetry": "on / off, neighbours", "median updates/s": median(pairs),
                 "gateway CPU ms /update": "",
                 "windows updates/s": " ".join(f"{p:.3f}" for p in pairs)})
    print_table(f"telegram gateway ({mode}, {storage}): {users} users x {per_user} messages "
                f"per window, telemetry off vs on{' (with spans)' if spans else ''}, "
                f"{rounds} windows each", rows)
    write_json("observability", {"users": users, "per_user": per_user, "mode": mode,
                                 "spans": spans, "storage": storage, "off updates/s": off,
                                 "on updates/s": on, "ratio": on / off,
                                 "neighbour ratios": pairs,
                                 "median neighbour ratio": median(pairs),
                                 "cpu ratio": cpu[True] / cpu[False],
                                 "windows": [{"telemetry": "on" if on else "off", **w}
                                             for on, w in windows],
                                 "lost": result["lost"], "doubled": result["doubled"]})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="windows with telemetry on, and off")
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--per-user", type=int, default=5)
    ap.add_argument("--storage", choices=["sqlite", "postgres"], default="postgres")
    ap.add_argument("--mode", choices=["polling", "webhook"], default="polling")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds per window, at most")
    ap.add_argument("--spans", action="store_true",
                    help="on: make the SDK's spans too (as with an OTLP endpoint)")
    a = ap.parse_args()
    asyncio.run(main(a.rounds, a.users, a.per_user, a.storage, a.mode, a.deadline, a.spans))
