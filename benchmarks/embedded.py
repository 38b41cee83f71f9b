"""The embedded engine's throughput under concurrent streams vs `model.generate`, same run.

    .venv/bin/python benchmarks/embedded.py [--concurrency 1,8,32] [--tokens 64] [--runs 3]
                                            [--precisions bf16,fp32] [--decode-threads 1]
                                            [--prompts questions|references]

For each precision (default: bf16 and fp32 where the machine computes bf16 natively, else fp32)
and each concurrency n, one run measures, back to back and in alternating order:

- `engine`: n conversations streamed concurrently through `EmbeddedBackend.stream` (continuous
  batching), every request on the base model;
- `engine+2 adapters`: the same with the rows spread over the base model and two random rank-8
  LoRA adapters (peft, all seven projections), so one batch mixes three sets of weights;
- `engine, no drafts` (where n rows leave padding rows in a step, see `ROW_BLOCK`): `engine`
  with draft tokens off, so without prompt lookup in the padding rows;
- `engine, plain weights` and `engine+2 adapters, plain weights`: a second engine whose
  decoding steps multiply by the plain weights (`EmbeddedBackend(packed_weights=False)`, the
  engine before `batching.pack_weights`);
- `generate`: the same n prompts as one static, left-padded `model.generate` batch (greedy, no
  streaming, the transformers default attention) - the baseline;
- `generate + prompt lookup` (n = 1, the only batch size transformers drafts for):
  `model.generate(prompt_lookup_num_tokens=3)`.

`--prompts questions` (default) asks short customer questions; `references` asks them with two
approved answers from the answer memory in the prompt, as the gateway sends a question between
the memory's two thresholds (`inference.prompt.with_references`, `reference_exchanges`).

Every request generates exactly --tokens tokens (end-of-sequence ignored on both sides).
Reports aggregate completion tokens/s (median over --runs), the engine/generate ratio, the
engine's time to first token, the share of draft tokens the engine kept, and the peak memory each
added to the process (resident set sampled every 5 ms, minus the resident set before the
measurement). Writes JSON to
benchmarks/results/embedded.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import MODEL_DIR, RESULTS, median, print_table, write_json  # noqa: E402
from inference.base import ChatMessage, GenerationRequest, TextDelta  # noqa: E402
from inference.batching import ROW_BLOCK, native_bf16  # noqa: E402
from inference.embedded import EmbeddedBackend  # noqa: E402
from inference.prompt import reference_exchanges, with_references  # noqa: E402

QUESTIONS = [
    "How do I reset my password?", "What are your opening hours?", "Can I change my order?",
    "How long does shipping take?", "Do you ship abroad?", "How do I cancel my subscription?",
    "Where is my parcel?", "Can I pay by invoice?",
]
ADAPTERS = [None, "bench-a", "bench-b"]
SYSTEM = "You are a helpful assistant. Answer briefly."
REFERENCES = [  # (question, approved answer) pairs, the closest last as the memory gives them
    ("How long do I have to return an item?",
     "You can return any item within 30 days of delivery. Start the return in your account "
     "under Orders, print the label, and drop the parcel at any post office."),
    ("How do I reset my password?",
     "Click 'Forgot password' on the sign-in page, enter your e-mail address and follow the "
     "link we send you; it is valid for one hour."),
]
PROMPTS = "questions"  # or "references" (--prompts)


def _messages(i: int) -> list[ChatMessage]:
    question = ChatMessage("user", f"{QUESTIONS[i % len(QUESTIONS)]} (ticket {i})")
    if PROMPTS == "references":
        return [ChatMessage("system", with_references(SYSTEM, REFERENCES)),
                *reference_exchanges(REFERENCES), question]
    return [ChatMessage("system", SYSTEM), question]


class PeakRss:
    """The largest resident set above the starting one while the block runs (sampled)."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()

    @staticmethod
    def rss_mb() -> float:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> PeakRss:
        self._start = self.rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, self.rss_mb() - self._start)

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


async def engine_run(backend: EmbeddedBackend, n: int, tokens: int,
                     adapters: bool, drafts: bool = True) -> dict[str, float]:
    ttfts: list[float] = []
    done = 0
    engine = backend.engine
    engine.drafts = drafts
    drafted, accepted = engine.drafted, engine.accepted

    async def one(i: int) -> None:
        nonlocal done
        request = GenerationRequest(_messages(i), max_tokens=tokens,
                                    adapter=ADAPTERS[i % 3] if adapters else None)
        first = True
        async for event in backend.stream(request):
            if isinstance(event, TextDelta) and first:
                ttfts.append(time.perf_counter() - start)
                first = False
            elif not isinstance(event, TextDelta):
                done += event.completion_tokens

    with PeakRss() as mem:
        start = time.perf_counter()
        await asyncio.gather(*[one(i) for i in range(n)])
        elapsed = time.perf_counter() - start
    assert done == n * tokens, (done, n * tokens)
    drafted, accepted = engine.drafted - drafted, engine.accepted - accepted
    return {"tokens_per_s": done / elapsed, "ttft_p50_ms": median(ttfts) * 1000,
            "drafts_kept": accepted / drafted if drafted else float("nan"),
            "peak_mb": mem.peak_mb}


def generate_run(model: Any, tokenizer: Any, n: int, tokens: int,
                 lookup: int | None = None) -> dict[str, float]:
    import torch

    texts = [tokenizer.apply_chat_template([{"role": m.role, "content": m.content}
                                            for m in _messages(i)],
                                           add_generation_prompt=True, tokenize=False)
             for i in range(n)]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with PeakRss() as mem, torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, top_p=None, top_k=None, temperature=None,
                             pad_token_id=tokenizer.eos_token_id,
                             prompt_lookup_num_tokens=lookup)
        elapsed = time.perf_counter() - start
    made = (out.shape[1] - enc["input_ids"].shape[1]) * n
    assert made == n * tokens, (made, n * tokens)
    return {"tokens_per_s": made / elapsed, "ttft_p50_ms": float("nan"),
            "drafts_kept": float("nan"), "peak_mb": mem.peak_mb}


def _kinds(n: int) -> list[str]:
    kinds = ["engine", "engine+2 adapters", "engine, plain weights",
             "engine+2 adapters, plain weights"]
    if n % ROW_BLOCK:  # a step has padding rows for drafts
        kinds.append("engine, no drafts")
    kinds.append("generate")
    if n == 1:
        kinds.append("generate + prompt lookup")
    return kinds


async def bench_precision(precision: str, args: argparse.Namespace,
                          adapter_dirs: list[Path]) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM

    backends, loaded_mb = {}, {}
    for packed in (True, False):
        before = PeakRss.rss_mb()
        backend = EmbeddedBackend(str(MODEL_DIR), precision=precision,
                                  max_batch=max(args.levels),
                                  decode_threads=args.decode_threads or None,
                                  max_kv_tokens=max(args.levels) * (args.tokens + 512),
                                  packed_weights=packed)
        backend.engine.eos_ids = set()  # every request makes exactly --tokens tokens
        for name, path in zip(ADAPTERS[1:], adapter_dirs, strict=True):
            await backend.load_adapter(name, str(path))
        await engine_run(backend, 2, 4, adapters=True)  # warm it up
        backends[packed] = backend
        loaded_mb["packed weights" if packed else "plain weights"] = round(
            PeakRss.rss_mb() - before)
    print(f"  {precision} resident MB of a loaded engine (model, adapters): {loaded_mb}",
          flush=True)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=dtype).eval()
    tokenizer = backends[True].tokenizer
    generate_run(model, tokenizer, 2, 4)
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    for run in range(args.runs):
        for n in args.levels:
            kinds = _kinds(n)
            for kind in kinds if run % 2 == 0 else kinds[::-1]:  # alternate the order
                if kind.startswith("generate"):
                    r = await asyncio.to_thread(generate_run, model, tokenizer, n,
                                                args.tokens, 3 if "lookup" in kind else None)
                else:
                    r = await engine_run(backends["plain weights" not in kind], n, args.tokens,
                                         adapters="adapters" in kind,
                                         drafts="no drafts" not in kind)
                results.setdefault((n, kind), []).append(r)
                print(f"  {precision} run {run + 1} n={n} {kind}: "
                      f"{r['tokens_per_s']:.1f} tok/s", flush=True)
    for backend in backends.values():
        await backend.aclose()
    rows = []
    for n in args.levels:
        base = median([r["tokens_per_s"] for r in results[(n, "generate")]])
        for kind in _kinds(n):
            rs = results[(n, kind)]
            tps = median([r["tokens_per_s"] for r in rs])
            rows.append({"precision": precision, "concurrent": n, "path": kind,
                         "tokens_per_s": round(tps, 1),
                         "vs_generate": round(tps / base, 2),
                         "ttft_p50_ms": round(median([r["ttft_p50_ms"] for r in rs]), 0),
                         "drafts_kept": round(median([r["drafts_kept"] for r in rs]), 2),
                         "peak_mb": round(median([r["peak_mb"] for r in rs]), 0),
                         "runs": [round(r["tokens_per_s"], 1) for r in rs],
                         "engine_mb": loaded_mb})
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--precisions", default="bf16,fp32" if native_bf16() else "fp32")
    parser.add_argument("--decode-threads", type=int, default=1,
                        help="the engine's decoding threads (0: torch's count, as prefill)")
    parser.add_argument("--prompts", choices=["questions", "references"], default="questions")
    parser.add_argument("--out", type=Path, default=RESULTS / "embedded.json")
    args = parser.parse_args()
    global PROMPTS
    PROMPTS = args.prompts
    args.levels = [int(x) for x in args.concurrency.split(",")]

    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = [random_adapter(Path(tmp), seed) for seed in (1, 2)]
        for precision in args.precisions.split(","):
            rows += await bench_precision(precision, args, adapter_dirs)
    load = [round(x, 1) for x in (*load_before, *os.getloadavg())]
    print_table(f"embedded engine (decode threads {args.decode_threads or 'torch'}) vs "
                f"model.generate, {args.prompts}, {args.tokens} new tokens per request, "
                f"medians of {args.runs} runs (load average before {load[:3]}, after {load[3:]})",
                [{k: v for k, v in r.items() if k not in ("runs", "engine_mb")} for r in rows])
    data = {"tokens": args.tokens, "runs": args.runs, "native_bf16": native_bf16(),
            "decode_threads": args.decode_threads, "prompts": args.prompts,
            "load_average_before": load[:3], "load_average_after": load[3:], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out == RESULTS / "embedded.json":
        write_json("embedded", data)
    else:
        import json

        args.out.write_text(json.dumps(data, indent=2))
        print(f"\nwrote {args.out}")


def random_adapter(tmp: Path, seed: int) -> Path:
    """A random rank-8 LoRA adapter on all seven projections (the training default's targets)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    target = tmp / f"lora-all-r8-s{seed}"
    peft_model.save_pretrained(target)
    return target


if __name__ == "__main__":
    asyncio.run(main())
