"""The embedded engine: transformers + peft on the CPU, in-process.

Generation runs on one worker thread, so the event loop never blocks and peft's
active-adapter state is only touched by one request at a time: concurrent
requests queue and each gets exactly the text it would get alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from inference.adapters import validate_adapter
from inference.base import Finished, GenerationRequest, StreamEvent, TextDelta
from inference.errors import AdapterNotFound, AdapterRejected, ContextTooLong, InferenceError

_DONE = object()


class EmbeddedBackend:
    """Serves a local HF model directory and any number of peft LoRA adapters."""

    def __init__(
        self, model_dir: str, *, model_name: str | None = None, max_lora_rank: int = 64
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name = model_name or Path(model_dir).name
        self._max_lora_rank = max_lora_rank
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self._model.eval()
        self._context = int(getattr(self._model.config, "max_position_embeddings", 2048))
        self._adapters: dict[str, str] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-gen")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        if request.adapter is not None and request.adapter not in self._adapters:
            raise AdapterNotFound(f"adapter {request.adapter!r} is not loaded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        future = loop.run_in_executor(self._worker, self._generate, request, emit, cancel)
        try:
            while (item := await queue.get()) is not _DONE:
                yield TextDelta(item)
            yield await future
        finally:
            cancel.set()  # the client went away: stop generating at the next token

    def _generate(
        self, request: GenerationRequest, emit: Any, cancel: threading.Event
    ) -> Finished:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):
            def __call__(self, *_: Any, **__: Any) -> bool:
                return cancel.is_set()

        try:
            ids = self._encode(request)
            streamer = _DeltaStreamer(self.tokenizer, emit)
            with self._route(request.adapter), torch.inference_mode():
                out = self._model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=request.max_tokens,
                    do_sample=request.temperature > 0,
                    temperature=request.temperature if request.temperature > 0 else None,
                    top_p=None,
                    top_k=None,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([Cancelled()]),
                    pad_token_id=self.tokenizer.eos_token_id,
                )
            new = out[0, ids.shape[1] :]
            eos = self.tokenizer.eos_token_id
            stopped = len(new) > 0 and int(new[-1]) == eos
            reason = "stop" if stopped or len(new) < request.max_tokens else "length"
            return Finished(reason, int(ids.shape[1]), len(new))
        except InferenceError:
            raise
        except Exception as exc:  # torch / transformers failures become typed errors
            raise InferenceError(f"generation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            emit(_DONE)

    def _encode(self, request: GenerationRequest) -> Any:
        ids = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in request.messages],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        if ids.shape[1] + request.max_tokens > self._context:
            raise ContextTooLong(
                f"{ids.shape[1]} prompt tokens + {request.max_tokens} exceed {self._context}"
            )
        return ids

    @contextlib.contextmanager
    def _route(self, adapter: str | None) -> Iterator[None]:
        if not self._adapters:
            yield
        elif adapter is None:
            with self._model.disable_adapter():
                yield
        else:
            self._model.set_adapter(adapter)
            yield

    async def health(self) -> None:
        return None

    async def load_adapter(self, name: str, path: str) -> None:
        validate_adapter(path, max_rank=self._max_lora_rank)
        if name in self._adapters:
            raise AdapterRejected(f"adapter name {name!r} is taken: use a new versioned name")
        await asyncio.get_running_loop().run_in_executor(self._worker, self._load, name, path)

    def _load(self, name: str, path: str) -> None:
        from peft import PeftModel

        try:
            if not self._adapters:
                self._model = PeftModel.from_pretrained(self._model, path, adapter_name=name)
            else:
                self._model.load_adapter(path, adapter_name=name)
        except (OSError, ValueError, RuntimeError) as exc:
            raise AdapterRejected(f"cannot load adapter {name!r} from {path}: {exc}") from exc
        self._model.eval()
        self._adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise AdapterNotFound(f"adapter {name!r} is not loaded")
        await asyncio.get_running_loop().run_in_executor(self._worker, self._unload, name)

    def _unload(self, name: str) -> None:
        del self._adapters[name]
        if self._adapters:
            if self._model.active_adapter == name:
                self._model.set_adapter(next(iter(self._adapters)))
            self._model.delete_adapter(name)
        else:
            self._model = self._model.unload()  # back to the plain base model

    async def list_adapters(self) -> list[str]:
        return list(self._adapters)

    async def aclose(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


class _DeltaStreamer:
    """A transformers streamer that emits decoded text deltas (whole characters only)."""

    def __init__(self, tokenizer: Any, emit: Any) -> None:
        self._tokenizer = tokenizer
        self._emit = emit
        self._tokens: list[int] = []
        self._sent = 0
        self._prompt_skipped = False

    def put(self, value: Any) -> None:
        if not self._prompt_skipped:  # generate() first hands over the prompt
            self._prompt_skipped = True
            return
        self._tokens.extend(int(t) for t in value.reshape(-1).tolist())
        text = self._tokenizer.decode(self._tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        if len(text) > self._sent:
            self._emit(text[self._sent :])
            self._sent = len(text)

    def end(self) -> None:
        text = self._tokenizer.decode(self._tokens, skip_special_tokens=True)
        if len(text) > self._sent:
            self._emit(text[self._sent :])
            self._sent = len(text)

