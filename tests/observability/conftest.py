"""Telemetry switched on for one test (an in-memory span exporter), and a Telegram bot to drive."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from bots.core import ConversationCore, CoreLimits, StaticRouter
from bots.telegram import TelegramChannel, TelegramOptions, make_bot
from bots.telegram.outbound import RetryPolicy
from chatloop import telemetry
from chatloop.telemetry import metrics
from chatloop.telemetry.tracing import make_provider
from inference.prompt import PromptFitter
from tests.fakes.inference import ScriptedBackend
from tests.fakes.telegram_api import TOKEN, FakeTelegram
from tests.fakes.vllm_server import free_port
from tests.telegram.conftest import FAST, Bot, fake, tokenizer  # noqa: F401 (fixtures)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Metrics and tracing on, spans kept in memory; everything off again afterwards."""
    exporter = InMemorySpanExporter()
    provider = make_provider("chatloop-test", otlp=False,
                             processors=(SimpleSpanProcessor(exporter),))
    telemetry.configure(metrics=True, tracer_provider=provider)
    yield exporter
    telemetry.configure()


@pytest.fixture
async def scrape() -> AsyncIterator[Callable[[], Awaitable[dict[tuple[str, tuple], float]]]]:
    """GET /metrics from the metrics server, parsed: {(sample name, sorted labels): value}."""
    port = free_port()
    server = metrics.serve(host="127.0.0.1", port=port)
    assert server is not None

    async def get() -> dict[tuple[str, tuple], float]:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/metrics")
        response.raise_for_status()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(response.text)
                for s in family.samples}

    yield get
    server.shutdown()


@pytest.fixture
async def telegram_bot(fake: FakeTelegram, sessions: Any, tokenizer: Any  # noqa: F811
                       ) -> AsyncIterator[Callable[..., Awaitable[Bot]]]:
    started: list[TelegramChannel] = []

    async def start(*, adapter: str | None = None, loaded: bool = True) -> Bot:
        """A bot routing every conversation to `adapter` (`loaded` in the backend, or not)."""
        backend = ScriptedBackend(adapters={adapter} if adapter and loaded else set())
        core = ConversationCore(
            sessions=sessions, backend=backend,
            fitter=PromptFitter(tokenizer, context_tokens=2048, max_tokens=128),
            system_prompt="Be brief.", limits=CoreLimits(max_tokens=128),
            router=StaticRouter(adapter))
        channel = TelegramChannel(
            core=core, bot=make_bot(TOKEN, api_base=fake.base_url),  # type: ignore[attr-defined]
            options=TelegramOptions(**FAST), retry=RetryPolicy(backoff_s=0.05, max_backoff_s=0.2))
        await channel.start()
        started.append(channel)
        return Bot(fake, channel, core, backend, sessions)

    yield start
    for channel in started:
        await channel.stop()
