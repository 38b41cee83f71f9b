"""The embedded engine on the real bundled model: streaming, adapters per request, concurrency."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from inference.base import ChatMessage, Finished, GenerationRequest, TextDelta
from inference.embedded import EmbeddedBackend
from inference.errors import AdapterNotFound, AdapterRejected
from tests.fakes.lora import make_lora_adapter

pytestmark = pytest.mark.slow

QUESTION = [ChatMessage("user", "What is the capital of France?")]


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> EmbeddedBackend:
    return EmbeddedBackend(str(model_dir), model_name="smol")


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_adapter(model_dir, tmp_path_factory.mktemp("lora"), rank=8, seed=1)


async def collect(engine: EmbeddedBackend, request: GenerationRequest) -> tuple[str, Finished, int]:
    text, deltas, done = "", 0, None
    async for ev in engine.stream(request):
        if isinstance(ev, TextDelta):
            text += ev.text
            deltas += 1
        else:
            done = ev
    assert done is not None
    return text, done, deltas


async def test_streams_deltas_without_blocking_the_loop(engine: EmbeddedBackend) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    started = time.perf_counter()
    text, done, deltas = await collect(engine, GenerationRequest(QUESTION, max_tokens=24))
    elapsed = time.perf_counter() - started
    t.cancel()
    assert "Paris" in text
    assert deltas > 3 and done.completion_tokens > 3 and done.prompt_tokens > 5
    assert ticks > elapsed / 0.01 * 0.3  # the loop kept running during generation


async def test_concurrent_requests_on_different_adapters_match_solo_runs(
    engine: EmbeddedBackend, adapter_dir: Path
) -> None:
    await engine.load_adapter("fb-v1", str(adapter_dir))
    try:
        base = GenerationRequest(QUESTION, max_tokens=16)
        tuned = GenerationRequest(QUESTION, max_tokens=16, adapter="fb-v1")
        solo_base = (await collect(engine, base))[0]
        solo_tuned = (await collect(engine, tuned))[0]
        assert solo_base != solo_tuned  # the adapter really changes the output
        together = await asyncio.gather(collect(engine, base), collect(engine, tuned),
                                        collect(engine, base), collect(engine, tuned))
        assert [t[0] for t in together] == [solo_base, solo_tuned, solo_base, solo_tuned]
    finally:
        await engine.unload_adapter("fb-v1")


async def test_unknown_adapter_and_reused_name_are_refused(
    engine: EmbeddedBackend, adapter_dir: Path
) -> None:
    with pytest.raises(AdapterNotFound):
        await collect(engine, GenerationRequest(QUESTION, max_tokens=4, adapter="nope"))
    await engine.load_adapter("fb-v2", str(adapter_dir))
    try:
        with pytest.raises(AdapterRejected):
            await engine.load_adapter("fb-v2", str(adapter_dir))
    finally:
        await engine.unload_adapter("fb-v2")
    assert await engine.list_adapters() == []


async def test_adapter_rank_over_the_limit_is_rejected_before_loading(
    model_dir: Path, tmp_path: Path
) -> None:
    big = make_lora_adapter(model_dir, tmp_path, rank=32, seed=2)
    small_limit = EmbeddedBackend(str(model_dir), max_lora_rank=16)
    with pytest.raises(AdapterRejected, match="greater than"):
        await small_limit.load_adapter("big", str(big))
