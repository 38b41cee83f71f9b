"""The CLI's operator-facing behaviour: clear one-line errors, idempotent preparation."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT


def chatloop(*args: str, env: dict[str, str] | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatloop.cli", *args], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def test_serve_on_unmigrated_database_says_what_to_run(tmp_path: Path) -> None:
    done = chatloop("serve", env={"CHATLOOP_DATABASE_URL": f"sqlite:///{tmp_path}/new.db"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("not migrated: run `chatloop db upgrade`")


def test_serve_on_unreachable_database_exits_with_one_line(tmp_path: Path) -> None:
    url = "postgresql://postgres@127.0.0.1:1/nothing"
    done = chatloop("serve", env={"CHATLOOP_DATABASE_URL": url})
    assert done.returncode == 2
    assert "is unreachable" in done.stderr.strip().splitlines()[-1]


def test_db_upgrade_then_serve_needs_a_model(tmp_path: Path) -> None:
    env = {"CHATLOOP_DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite",
           "CHATLOOP_MODEL": str(tmp_path / "no-model")}
    assert chatloop("db", "upgrade", env=env).returncode == 0
    done = chatloop("serve", env=env)
    assert done.returncode == 2 and "run `chatloop model prepare`" in done.stderr


def test_webchat_under_serve_requires_a_token(tmp_path: Path) -> None:
    done = chatloop("serve", env={"CHATLOOP_WEBCHAT_ENABLED": "true"})
    assert done.returncode == 2 and "CHATLOOP_WEBCHAT_TOKEN" in done.stderr


def test_webchat_under_serve_requires_a_secret_for_its_identities() -> None:
    done = chatloop("serve", env={"CHATLOOP_WEBCHAT_ENABLED": "true",
                                  "CHATLOOP_WEBCHAT_TOKEN": "t0ken"})
    assert done.returncode == 2 and "CHATLOOP_WEBCHAT_SECRET" in done.stderr


def test_the_old_reviewer_list_is_refused_with_the_new_form() -> None:
    done = chatloop("serve", env={"CHATLOOP_REVIEWER_IDS": '["111"]'})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "chatloop: bad configuration: CHATLOOP_REVIEWER_IDS: Value error, no longer read: "
        "reviewers are identities (channel:id); remove it and set "
        """CHATLOOP_REVIEWERS='["telegram:111"]'""")


def test_the_demo_keeps_its_web_identity_secret(tmp_path: Path) -> None:
    from chatloop.cli import _kept_secret

    path = tmp_path / "var/webchat-secret"
    secret = _kept_secret(path)
    assert len(secret) >= 32 and _kept_secret(path) == secret  # the same after a restart
    assert path.stat().st_mode & 0o777 == 0o600


def test_bad_configuration_is_named() -> None:
    done = chatloop("serve", env={"CHATLOOP_PORT": "99999"})
    assert done.returncode == 2 and "CHATLOOP_PORT" in done.stderr


@pytest.mark.slow
def test_model_prepare_is_idempotent_and_fast_the_second_time(model_dir: Path) -> None:
    started = time.perf_counter()
    done = chatloop("model", "prepare", "--target", str(model_dir))
    assert done.returncode == 0, done.stderr
    assert time.perf_counter() - started < 15  # interpreter start-up included; the work is ~0
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()


@pytest.mark.slow
def test_model_prepare_accepts_a_local_hf_directory(model_dir: Path, tmp_path: Path) -> None:
    done = chatloop("model", "prepare", str(model_dir), "--target", str(tmp_path / "copy"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "copy/config.json").exists()


def test_model_prepare_rejects_a_missing_source(tmp_path: Path) -> None:
    done = chatloop("model", "prepare", str(tmp_path / "nothing-here"),
                    "--target", str(tmp_path / "out"), env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and "neither a local HF model directory" in done.stderr


def test_empty_channel_tokens_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatloop.settings import Settings

    # compose passes `TELEGRAM_BOT_TOKEN: ${TELEGRAM_BOT_TOKEN:-}`: empty must not start a bot
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "")
    monkeypatch.setenv("SLACK_BOT_TOKEN", "")
    settings = Settings(_env_file=None)
    assert settings.telegram.bot_token is None and settings.slack.bot_token is None
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "123:abc")
    assert Settings(_env_file=None).telegram.bot_token.get_secret_value() == "123:abc"


def test_serve_reports_health_and_readiness_of_its_inference_server(
    tmp_path: Path, model_dir: Path
) -> None:
    from benchmarks._common import start_process
    from tests.fakes.vllm_server import free_port

    stub_port, port = free_port(), free_port()
    db = f"sqlite:///{tmp_path}/db.sqlite"
    assert chatloop("db", "upgrade", env={"CHATLOOP_DATABASE_URL": db}).returncode == 0
    env = {"CHATLOOP_DATABASE_URL": db, "CHATLOOP_PORT": str(port),
           "CHATLOOP_MODEL": str(model_dir), "CHATLOOP_MAX_RETRIES": "0",
           "CHATLOOP_INFERENCE_URL": f"http://127.0.0.1:{stub_port}/v1"}
    # the inference server is not up yet: the gateway starts anyway and says it is not ready
    gateway = subprocess.Popen([sys.executable, "-m", "chatloop.cli", "serve"], cwd=ROOT,
                               env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    stub = None
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                healthz = httpx.get(f"{base}/healthz", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and gateway.poll() is None
                time.sleep(0.2)
        assert healthz.json() == {"status": "ok"}
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["inference"] == "unavailable"
        stub = start_process([sys.executable, "-m", "tests.fakes.openai_stub", "--port",
                              str(stub_port)], f"http://127.0.0.1:{stub_port}/health")
        ready = _readyz_until(f"{base}/readyz", 200)  # the probe is cached a few seconds
        assert ready.json() == {"ready": True, "database": "ok", "inference": "ok"}
        assert httpx.get(f"{base}/chat", timeout=5).status_code == 404  # web chat is off
        stub.kill()
        stub.wait()
        ready = _readyz_until(f"{base}/readyz", 503)
        assert ready.json() == {"ready": False, "database": "ok", "inference": "unavailable"}
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200  # alive all the same
    finally:
        if stub is not None:
            stub.kill()
        gateway.terminate()
        gateway.wait(timeout=30)


def _readyz_until(url: str, status: int, within_s: float = 30) -> httpx.Response:
    deadline = time.monotonic() + within_s
    while (ready := httpx.get(url, timeout=10)).status_code != status:
        assert time.monotonic() < deadline, ready.text
        time.sleep(0.2)
    return ready


def test_serve_exits_with_one_line_when_a_channel_cannot_start(tmp_path: Path,
                                                               model_dir: Path) -> None:
    db = f"sqlite:///{tmp_path}/db.sqlite"
    assert chatloop("db", "upgrade", env={"CHATLOOP_DATABASE_URL": db}).returncode == 0
    done = chatloop("serve", env={"CHATLOOP_DATABASE_URL": db, "CHATLOOP_MODEL": str(model_dir),
                                  "TELEGRAM_BOT_TOKEN": "123:abc",
                                  "CHATLOOP_TELEGRAM_API_BASE": "http://127.0.0.1:9"})
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("chatloop: channel telegram could not start:"), last
    assert "Unclosed client session" not in done.stderr
