"""`chatloop serve` with a slow scripted model, as a process the restart test can SIGKILL.

Configured by the same environment variables as the real gateway, plus SCRIPTED_DELAY.
"""

from __future__ import annotations

import asyncio
import os

import uvicorn

from chatloop.app import build_app, build_services
from chatloop.settings import Settings
from inference.base import GenerationRequest
from tests.fakes.inference import ScriptedBackend


def answer(request: GenerationRequest) -> str:
    return f"Answer to {request.messages[-1].content}: " + "more words " * 8


async def main() -> None:
    settings = Settings()
    backend = ScriptedBackend(answer=answer, chunk=8, delay=float(os.environ["SCRIPTED_DELAY"]))
    services = await build_services(settings, backend=backend)
    config = uvicorn.Config(build_app(services, webchat=False), host="127.0.0.1",
                            port=settings.gateway.port, log_level="warning")
    await uvicorn.Server(config).serve()


if __name__ == "__main__":
    asyncio.run(main())
