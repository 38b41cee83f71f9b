"""An instant OpenAI-compatible chat server (SSE streaming with usage), for benchmarks and tests.

Run as a separate process so that it does not share the measured event loop:
    python -m tests.fakes.openai_stub --port 8011 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


def make_app(tokens: int, served: str = "chatloop-base") -> Starlette:
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        n = min(tokens, int(body.get("max_tokens") or tokens))

        async def events():  # type: ignore[no-untyped-def]
            base = {"id": "stub", "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": body["model"]}
            for i in range(n):
                delta = {"content": f"w{i} "}
                yield "data: " + json.dumps({**base, "choices": [
                    {"index": 0, "delta": delta, "finish_reason": None}]}) + "\n\n"
            yield "data: " + json.dumps({**base, "choices": [
                {"index": 0, "delta": {}, "finish_reason": "length"}]}) + "\n\n"
            yield "data: " + json.dumps({**base, "choices": [], "usage": {
                "prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def completion(request: Request) -> JSONResponse:  # the health probe's tiny one
        body = await request.json()
        return JSONResponse({"id": "stub", "object": "text_completion", "created": 0,
                             "model": body["model"], "choices": [
                                 {"index": 0, "text": "w0", "finish_reason": "length"}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                       "total_tokens": 2}})

    async def models(_: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": served, "object": "model", "created": 0, "owned_by": "stub"}]})

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/completions", completion, methods=["POST"]),
                             Route("/v1/models", models),
                             Route("/health", health)])


if __name__ == "__main__":
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    uvicorn.run(make_app(args.tokens), host="127.0.0.1", port=args.port, log_level="warning")
