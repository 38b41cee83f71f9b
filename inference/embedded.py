"""The embedded engine: transformers + peft, in-process, with continuous batching.

Concurrent requests share forward passes (`inference.batching.BatchEngine`): a request joins the
running batch between two decoding steps, streams its own tokens, and leaves when it stops or its
client goes away. Rows in one batch may use different LoRA adapters. `precision="auto"` serves
bf16 where the hardware computes it natively (the rule training uses), fp32 elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from inference.adapters import validate_adapter
from inference.base import Finished, GenerationRequest, StreamEvent, TextDelta, chat_dicts
from inference.batching import (
    ATTENTION,
    BatchEngine,
    Row,
    batch_invariant_lora,
    cap_onednn_isa,
    pack_weights,
    register_attention,
    serving_dtype,
)
from inference.errors import AdapterNotFound, AdapterRejected, ContextTooLong

cap_onednn_isa()  # on import: before this process's first bf16 product (batching.ONEDNN_ISA)


class EmbeddedBackend:
    """Serves a local HF model directory and any number of peft LoRA adapters.

    `precision` "auto" serves bf16 where it is native; the default stays fp32 because the
    learning loop's parity check compares against fp32 peft outputs (bf16 serving does not
    reproduce them). `max_batch` rows decode together and their KV caches hold at most
    `max_kv_tokens` tokens (each request reserves its prompt plus `max_tokens`); requests beyond
    wait their turn. Decoding steps, a lone row's included, run on `decode_threads` intra-op
    threads (None: torch's count, which prefill uses). `packed_weights` keeps a copy of the
    linear weights reordered for decoding steps where the CPU's kernels allow
    (`batching.pack_weights`: 1.1-2 times the tokens/s for twice the linear weights' memory).
    """

    def __init__(
        self, model_dir: str, *, model_name: str | None = None, max_lora_rank: int = 64,
        precision: str = "fp32", max_batch: int = 32, max_kv_tokens: int = 16384,
        decode_threads: int | None = 1, packed_weights: bool = True,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name = model_name or Path(model_dir).name
        self._max_lora_rank = max_lora_rank
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.dtype = serving_dtype(precision)
        register_attention()
        model: Any = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=self.dtype, attn_implementation=ATTENTION)
        model.eval()
        self.packed_layers = pack_weights(model, rows=max_batch) if packed_weights else 0
        self._context = int(getattr(model.config, "max_position_embeddings", 2048))
        self._adapters: dict[str, str] = {}
        eos = {self.tokenizer.eos_token_id, *_ids(model.generation_config.eos_token_id)}
        self.engine = BatchEngine(model, self.tokenizer, eos_ids={e for e in eos if e is not None},
                                  max_batch=max_batch, max_kv_tokens=max_kv_tokens,
                                  decode_threads=decode_threads)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        if request.adapter is not None and request.adapter not in self._adapters:
            raise AdapterNotFound(f"adapter {request.adapter!r} is not loaded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        def sink(item: Any) -> None:  # on the engine's thread
            with contextlib.suppress(RuntimeError):  # the caller's event loop is closed
                loop.call_soon_threadsafe(queue.put_nowait, item)

        row = Row(prompt=self._encode(request), max_tokens=request.max_tokens,
                  adapter=request.adapter, temperature=request.temperature, seed=request.seed,
                  sink=sink)
        self.engine.submit(row)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, str):
                    yield TextDelta(item)
                elif isinstance(item, Finished):
                    yield item
                    return
                else:
                    raise item
        finally:
            row.cancelled.set()  # the client went away: the row leaves at the next step
            self.engine.wake()

    def _encode(self, request: GenerationRequest) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            chat_dicts(request.messages), add_generation_prompt=True,
            return_dict=True,
        )["input_ids"]
        if len(ids) + request.max_tokens > self._context:
            raise ContextTooLong(
                f"{len(ids)} prompt tokens + {request.max_tokens} exceed {self._context}"
            )
        return list(ids)

    async def health(self) -> None:
        return None

    async def load_adapter(self, name: str, path: str) -> None:
        validate_adapter(path, max_rank=self._max_lora_rank)
        if name in self._adapters:
            raise AdapterRejected(f"adapter name {name!r} is taken: use a new versioned name")
        await asyncio.wrap_future(self.engine.call(lambda: self._load(name, path)))

    def _load(self, name: str, path: str) -> None:  # on the engine's thread, between steps
        from peft import PeftModel

        model = self.engine.model
        try:
            if not self._adapters:
                model = PeftModel.from_pretrained(model, path, adapter_name=name)
            else:
                model.load_adapter(path, adapter_name=name)
        except (OSError, ValueError, RuntimeError) as exc:
            raise AdapterRejected(f"cannot load adapter {name!r} from {path}: {exc}") from exc
        model.eval()
        batch_invariant_lora(model)
        self.engine.model = model
        self._adapters[name] = path
        self.engine.set_adapters(set(self._adapters))

    async def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise AdapterNotFound(f"adapter {name!r} is not loaded")
        await asyncio.wrap_future(self.engine.call(lambda: self._unload(name)))

    def _unload(self, name: str) -> None:  # on the engine's thread, between steps
        del self._adapters[name]
        self.engine.set_adapters(set(self._adapters))
        self.engine.unload_rows(name)
        model = self.engine.model
        if self._adapters:
            if model.active_adapter == name:
                model.set_adapter(next(iter(self._adapters)))
            model.delete_adapter(name)
            batch_invariant_lora(model)  # the layers' adapter stacks without it
        else:
            self.engine.model = model.unload()  # back to the plain base model

    async def list_adapters(self) -> list[str]:
        return list(self._adapters)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.engine.close)


def _ids(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]
