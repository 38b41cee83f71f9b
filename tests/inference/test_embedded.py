"""The embedded engine on the real bundled model: streaming, adapters per request, concurrency."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from inference.base import ChatMessage, Finished, GenerationRequest, TextDelta
from inference.batching import _lookup
from inference.embedded import EmbeddedBackend
from inference.errors import AdapterNotFound, AdapterRejected, ContextTooLong
from inference.prompt import reference_exchanges, with_references
from tests.fakes.lora import make_lora_adapter

pytestmark = pytest.mark.slow

QUESTION = [ChatMessage("user", "What is the capital of France?")]


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> EmbeddedBackend:
    return EmbeddedBackend(str(model_dir), model_name="smol")


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_adapter(model_dir, tmp_path_factory.mktemp("lora"), rank=8, seed=1)


async def until(check: Callable[[], bool], within: float = 120.0) -> None:
    """Wait for a condition of the engine's thread (polled: it has no asyncio events)."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


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


PROMPTS = ["What is the capital of France?", "Name three colours.", "How do I return an item?",
           "What are your opening hours?", "Say hello in Spanish.", "What is two plus two?"]


def ask(i: int, adapter: str | None, max_tokens: int = 10) -> GenerationRequest:
    return GenerationRequest([ChatMessage("user", PROMPTS[i % len(PROMPTS)])], max_tokens,
                             adapter=adapter)


async def test_a_batch_of_mixed_adapters_gives_each_row_its_solo_greedy_output(
    engine: EmbeddedBackend, adapter_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    other = make_lora_adapter(model_dir, tmp_path, rank=4, seed=3)
    await engine.load_adapter("mix-a", str(adapter_dir))
    await engine.load_adapter("mix-b", str(other))
    try:
        requests = [ask(i, [None, "mix-a", "mix-b"][i % 3]) for i in range(6)]
        solo = [await collect(engine, r) for r in requests]
        assert len({t for t, _, _ in solo[:3]}) == 3  # base and both adapters really differ
        steps = engine.engine.steps
        # all at once, then one more joining a running batch between two decoding steps
        first = [asyncio.create_task(collect(engine, r)) for r in requests]
        await until(lambda: engine.engine.steps > steps)
        late = await collect(engine, requests[4])
        together = await asyncio.gather(*first)
        assert engine.engine.peak_rows > 1  # rows really shared forward passes
        assert [t[0] for t in together] == [s[0] for s in solo]
        assert [t[1] for t in together] == [s[1] for s in solo]  # same finish and counts
        assert late[0] == solo[4][0]
    finally:
        await engine.unload_adapter("mix-a")
        await engine.unload_adapter("mix-b")


# a question between the answer memory's thresholds: approved answers quoted in the prompt
REFERENCES = [("How long do I have to return an item?",
               "You can return any item within 30 days of delivery. Start the return in your "
               "account under Orders, print the label, and drop the parcel at any post office.")]
QUOTING = [ChatMessage("system", with_references("You are a helpful assistant. Answer briefly.",
                                                  REFERENCES)),
           *reference_exchanges(REFERENCES),
           ChatMessage("user", "Until when can I send back a product?")]


def test_prompt_lookup_guesses_what_followed_the_last_tokens() -> None:
    assert _lookup([5, 6, 7, 8, 9, 1, 6, 7], 3) == [8, 9, 1]  # the last two tokens seen before
    assert _lookup([1, 2, 3, 1, 2, 4, 1, 2], 2) == [4, 1]  # the latest occurrence
    assert _lookup([5, 6, 7, 8, 6], 5) == [7, 8, 6]  # as many as follow
    assert _lookup([1, 2, 3], 3) == [] and _lookup([4], 3) == []


async def test_draft_tokens_in_padding_rows_keep_each_rows_greedy_output(
    engine: EmbeddedBackend, adapter_dir: Path
) -> None:
    """A step's padding rows decode draft tokens (prompt lookup) for greedy rows: the same
    text and finish as one token a step, in fewer steps, on the base model and an adapter,
    alone and beside another row; sampled rows draft nothing."""
    await engine.load_adapter("draft-a", str(adapter_dir))
    requests = [GenerationRequest(QUOTING, max_tokens=40),
                GenerationRequest(QUOTING, max_tokens=40, adapter="draft-a"), ask(2, None, 24)]
    results, counts = {}, {}
    try:
        for drafts in (False, True):
            engine.engine.drafts = drafts
            steps, drafted, accepted = (engine.engine.steps, engine.engine.drafted,
                                        engine.engine.accepted)
            alone = [await collect(engine, r) for r in requests]
            together = await asyncio.gather(*[collect(engine, r) for r in requests[:2]])
            results[drafts] = [(t, f) for t, f, _ in [*alone, *together]]
            counts[drafts] = (engine.engine.steps - steps, engine.engine.drafted - drafted,
                              engine.engine.accepted - accepted)
        engine.engine.drafts = True
        drafted = engine.engine.drafted
        await collect(engine, GenerationRequest(QUOTING, max_tokens=12, temperature=0.7,
                                                seed=1))
        assert engine.engine.drafted == drafted
    finally:
        engine.engine.drafts = True
        await engine.unload_adapter("draft-a")
    assert results[True] == results[False]
    assert "30 days" in results[True][0][0]  # the answer quotes the approved one
    assert counts[False][1:] == (0, 0) and counts[True][2] > 0
    assert counts[True][0] < counts[False][0]


async def test_cancelling_one_stream_leaves_the_others_untouched(engine: EmbeddedBackend) -> None:
    requests = [ask(i, None, max_tokens=12) for i in range(3)]
    solo = [(await collect(engine, r))[0] for r in requests]

    async def abandon() -> str:
        stream = engine.stream(ask(1, None, max_tokens=12))
        first = await anext(stream)
        await stream.aclose()  # the client went away after one delta
        assert isinstance(first, TextDelta)
        return first.text

    results = await asyncio.gather(collect(engine, requests[0]), abandon(),
                                   collect(engine, requests[2]))
    assert (results[0][0], results[2][0]) == (solo[0], solo[2])
    assert solo[1].startswith(results[1])
    await until(lambda: engine.engine.active_rows() == 0)
    assert engine.engine.active_rows() == 0  # the abandoned row left and freed its cache


async def test_rows_and_kv_tokens_are_capped_and_the_rest_queue(model_dir: Path) -> None:
    capped = EmbeddedBackend(str(model_dir), max_batch=3, max_kv_tokens=110)
    try:
        requests = [ask(i, None, max_tokens=10) for i in range(6)]  # about 47 tokens each
        solo = [(await collect(capped, r))[0] for r in requests]
        together = await asyncio.gather(*[collect(capped, r) for r in requests])
        assert [t[0] for t in together] == solo
        assert capped.engine.peak_rows == 2  # the KV cap binds: two rows' caches fit, not three
        assert capped.engine.peak_kv_tokens <= 110
        capped.engine.max_kv_tokens = 10_000
        together = await asyncio.gather(*[collect(capped, r) for r in requests])
        assert [t[0] for t in together] == solo
        assert capped.engine.peak_rows == 3  # now the row cap binds
        with pytest.raises(ContextTooLong, match="KV cache"):
            capped.engine.max_kv_tokens = 110
            await collect(capped, ask(0, None, max_tokens=390))
    finally:
        await capped.aclose()


async def test_unloading_an_adapter_fails_only_its_own_rows(
    engine: EmbeddedBackend, adapter_dir: Path
) -> None:
    await engine.load_adapter("gone", str(adapter_dir))
    base = ask(0, None, max_tokens=12)
    solo = (await collect(engine, base))[0]
    doomed = asyncio.create_task(collect(engine, ask(0, "gone", max_tokens=200)))
    kept = asyncio.create_task(collect(engine, base))
    steps = engine.engine.steps
    await until(lambda: engine.engine.steps >= steps + 2)
    await engine.unload_adapter("gone")
    with pytest.raises(AdapterNotFound):
        await doomed
    assert (await kept)[0] == solo


def test_serving_precision_follows_the_training_rule() -> None:
    from inference.batching import native_bf16, serving_dtype

    assert serving_dtype("auto") == (torch.bfloat16 if native_bf16() else torch.float32)
    assert serving_dtype("fp32") == torch.float32 and serving_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError):
        serving_dtype("fp8")


async def test_bf16_rows_decode_alike_alone_and_batched(model_dir: Path) -> None:
    """Precision "auto" serves bf16 on such machines: batching must not change its greedy text."""
    bf16 = EmbeddedBackend(str(model_dir), precision="bf16", max_batch=8)
    try:
        requests = [ask(i, None, max_tokens=12 + 3 * i) for i in range(8)]
        solo = [(await collect(bf16, r))[0] for r in requests]
        together = await asyncio.gather(*[collect(bf16, r) for r in requests])
        assert bf16.engine.peak_rows > 1  # rows really shared forward passes
        assert [t[0] for t in together] == solo
    finally:
        await bf16.aclose()


async def test_bf16_prompts_admitted_together_are_prefilled_together_as_alone(
        model_dir: Path, adapter_dir: Path, tmp_path: Path) -> None:
    """In bf16 the prompts admitted at once share prefill passes (one per adapter), and each
    row still gets its solo greedy text."""
    bf16 = EmbeddedBackend(str(model_dir), precision="bf16", max_batch=8)
    try:
        await bf16.load_adapter("pack-a", str(adapter_dir))
        await bf16.load_adapter("pack-b", str(make_lora_adapter(model_dir, tmp_path, rank=4,
                                                                seed=3)))
        requests = [ask(i, [None, "pack-a", "pack-b"][i % 3], max_tokens=10 + i)
                    for i in range(7)]
        solo = [(await collect(bf16, r))[0] for r in requests]
        assert len(set(solo[:3])) == 3  # base and both adapters really differ
        held, release = threading.Event(), threading.Event()

        def hold() -> None:  # the engine's thread waits: every request is queued meanwhile
            held.set()
            release.wait(60)

        blocker = bf16.engine.call(hold)
        await until(held.is_set)
        tasks = [asyncio.create_task(collect(bf16, r)) for r in requests]
        await until(lambda: len(bf16.engine._waiting) == len(requests))
        prefills = bf16.engine.prefills
        release.set()
        together = await asyncio.gather(*tasks)
        blocker.result(timeout=60)
        assert bf16.engine.prefills - prefills == 3  # one pass per adapter (and the base)
        assert [t[0] for t in together] == solo
    finally:
        await bf16.aclose()


class _Layers(torch.nn.Module):
    """Two projections and an LM head, shaped as the bundled model's."""

    def __init__(self, dtype: Any) -> None:
        super().__init__()
        self.up = torch.nn.Linear(576, 1536, bias=False, dtype=dtype)
        self.down = torch.nn.Linear(1536, 576, bias=True, dtype=dtype)
        self.head = torch.nn.Linear(576, 4096, bias=False, dtype=dtype)

    def get_output_embeddings(self) -> Any:
        return self.head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_give_a_row_the_same_product_in_any_batch(dtype: Any) -> None:
    """Decoding steps multiply by weights packed at load (`pack_weights`): a row's product is
    the layer's own, bitwise the same in every whole block of rows (a lone row of a 1536-wide
    input rounds differently: the engine never runs one, see ROW_BLOCK); prompts keep the plain
    weight; the LM head is packed for a prompt's scored tokens too, alike alone and packed.
    Packed on x86-64 with AVX512-BF16 (measured there), bf16 nowhere else; on other CPUs the
    layers are packed only if the kernels pass the same check."""
    from inference.batching import ROW_BLOCK, native_bf16, pack_weights

    torch.manual_seed(0)
    layers = _Layers(dtype)
    plain = {name: m.weight.clone() for name, m in layers.named_children()}
    packed = pack_weights(layers)
    if native_bf16():
        assert packed == 3
    elif dtype == torch.bfloat16:
        assert packed == 0
    assert packed in (0, 3)  # all of them or none
    x = torch.randn(32, 1, 576).to(dtype)
    with torch.inference_mode():
        for name, inputs in (("up", x), ("down", torch.randn(32, 1, 1536).to(dtype)),
                             ("head", x)):
            layer = getattr(layers, name)
            full = layer(inputs)
            for rows in range(ROW_BLOCK, 32, ROW_BLOCK):
                assert torch.equal(layer(inputs[:rows]), full[:rows]), (name, rows)
            expected = torch.nn.functional.linear(inputs.float(), plain[name].float(),
                                                  None if layer.bias is None
                                                  else layer.bias.float())
            tolerance = 1e-4 if dtype == torch.float32 else 0.1
            torch.testing.assert_close(full.float(), expected, atol=tolerance, rtol=tolerance)
        prompt = torch.randn(1, 40, 576).to(dtype)
        assert torch.equal(layers.up(prompt), torch.nn.functional.linear(prompt, plain["up"]))
        if not packed:
            return
        scored = layers.head(prompt[:, :8])  # a pack's prompts' last tokens
        assert all(torch.equal(layers.head(prompt[:, i:i + 1])[0, 0], scored[0, i])
                   for i in range(8))
        decoded = layers.up(x)
    with torch.no_grad():
        layers.up.weight.zero_()  # only prompts read the plain weight
    with torch.inference_mode():
        assert torch.equal(layers.up(x), decoded) and not layers.up(prompt).any()


def test_weights_whose_packed_products_depend_on_the_row_count_stay_plain(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import inference.batching as batching

    real = torch.ops.mkldnn._linear_pointwise

    def uneven(x: Any, *args: Any) -> Any:  # rounds a row by how many share the product
        return real(x, *args) + (x.shape[0] > 8) * 1e-3

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", uneven)
    layers = _Layers(torch.float32)
    assert batching.pack_weights(layers) == 0
    assert not any("_chatloop_packed" in m.__dict__ for m in layers.modules())


async def test_the_engine_decodes_with_packed_weights_unless_told_not_to(
        engine: EmbeddedBackend, model_dir: Path) -> None:
    linears = sum(isinstance(m, torch.nn.Linear) for m in engine.engine.model.modules())
    assert engine.packed_layers == linears > 200  # 7 projections x 30 layers and the LM head
    dense = EmbeddedBackend(str(model_dir), packed_weights=False)
    try:
        assert dense.packed_layers == 0
        assert not any("_chatloop_packed" in m.__dict__ for m in dense.engine.model.modules())
    finally:
        await dense.aclose()


def test_serving_keeps_onednn_off_amx_and_the_trainer_is_not_capped(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os

    import inference.batching as batching
    import inference.embedded  # noqa: F401  (caps on import)

    # AMX kernels round a bf16 row by its batch (test_bf16_rows_decode_alike_alone_and_batched)
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_BF16"
    monkeypatch.setattr(batching, "_capped", True)
    assert "ONEDNN_MAX_CPU_ISA" not in batching.training_env()
    monkeypatch.setattr(batching, "_capped", False)  # an operator's own choice reaches it
    assert batching.training_env()["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_BF16"
