"""A gateway process with the Slack channel and a scripted backend, for kill and load tests.

    python -m tests.slack.gateway_proc --db URL --slack-api URL --port N [--seconds 2]

It prints nothing; callers poll /healthz. Each answer takes `--seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from asyncio.subprocess import Process
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from chatloop.app import build_app, build_services
from chatloop.settings import Settings
from tests.fakes.inference import ScriptedBackend
from tests.fakes.vllm_server import free_port

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
TOKEN = "xoxb-test"
ROOT = Path(__file__).resolve().parents[2]


async def start(db_url: str, slack_api: str, *args: str,
                timeout_s: float = 60) -> tuple[Process, str]:
    """Run this module as a gateway process (extra `args` as on its command line) and wait
    until it answers /healthz; return the process and its base URL."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.slack.gateway_proc", "--db", db_url, "--slack-api",
        slack_api, "--port", str(port), *args, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url) as http:
        for _ in range(int(timeout_s * 10)):
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            assert proc.returncode is None, "the gateway process died at start-up"
            await asyncio.sleep(0.1)
    proc.kill()
    await proc.wait()
    raise TimeoutError("the gateway process did not start")


class CharTokenizer:
    """Counts about four characters a token; enough for prompt fitting with a scripted backend."""

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> list[int]:
        return list(range(sum(len(m["content"]) // 4 + 4 for m in messages)))


def scripted(seconds: float = 0.0, **kw: Any) -> ScriptedBackend:
    """A backend echoing the question; with `seconds`, a fixed 80-character answer in ten
    deltas `seconds / 10` apart (the benchmark's "2 s per answer")."""
    if seconds:
        kw.update(answer=lambda r: (f"Echo: {r.messages[-1].content} " + "." * 80)[:80],
                  chunk=8, delay=seconds / 10)
    backend = ScriptedBackend(**kw)
    backend.tokenizer = CharTokenizer()  # type: ignore[attr-defined]
    return backend


def slack_settings(db_url: str, api_base: str, **kw: Any) -> Settings:
    values: dict[str, Any] = dict(
        database_url=db_url, slack_bot_token=TOKEN, slack_signing_secret=SECRET,
        slack_api_base=api_base, slack_update_interval_s=0.02, reviewers=["slack:T111/UREV"],
        rate_limit_per_minute=1000, max_tokens=64,
        event_lease_s=1.0)  # a killed gateway's events are taken over after a second
    values.update(kw)
    return Settings.from_env_names(**values)


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--slack-api", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--tokenizer", help="a model directory: fit prompts with its real tokenizer")
    args = p.parse_args()
    settings = slack_settings(args.db, args.slack_api, slack_update_interval_s=args.interval,
                              max_concurrent_generations=args.concurrency)
    backend = scripted(args.seconds)
    if args.tokenizer:
        from transformers import AutoTokenizer

        backend.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)  # type: ignore[attr-defined]
    services = await build_services(settings, backend=backend)
    config = uvicorn.Config(build_app(services, webchat=False), host="127.0.0.1",
                            port=args.port, log_level="warning")
    await uvicorn.Server(config).serve()


if __name__ == "__main__":
    asyncio.run(main())
