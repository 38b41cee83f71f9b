"""The one settings object (environment variables and `.env`), read only by the composition root."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, concise customer-service assistant. Answer the user's question "
    "clearly in a few sentences. If you do not know, say so."
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CHATLOOP_", env_file=".env", extra="ignore", populate_by_name=True,
        env_ignore_empty=True,  # TOKEN= (as compose writes an unset variable) means unset
    )

    # storage
    database_url: str = "sqlite+aiosqlite:///var/chatloop.db"

    # gateway
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    webchat_enabled: bool = False
    webchat_token: SecretStr | None = None

    # inference
    inference_url: str | None = None  # an OpenAI-compatible /v1 endpoint; unset = embedded
    inference_api_key: SecretStr = SecretStr("EMPTY")
    served_model_name: str = "chatloop-base"
    model: str = "var/models/SmolLM2-135M-Instruct"
    model_source: str = "bundled"
    model_cache: Path = Path("var/cache")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=2, ge=0)
    max_lora_rank: int = Field(default=16, ge=1)
    adapter: str | None = None  # serve this adapter to every conversation (until a registry)

    # conversation core
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    context_tokens: int = Field(default=2048, ge=128)
    max_tokens: int = Field(default=256, ge=1)
    max_input_chars: int = Field(default=4000, ge=1)
    history_messages: int = Field(default=20, ge=0)
    rate_limit_per_minute: int = Field(default=20, ge=1)
    max_concurrent_generations: int = Field(default=32, ge=1)
    reviewer_ids: list[str] = Field(default_factory=list)
    # replicas: a process holds the events it works on for this long, renewed while it runs;
    # a crashed process's unfinished turns are taken over by another after it
    event_lease_s: float = Field(default=30.0, gt=0)
    replica_id: str | None = None  # default: host name and process id

    # learning loop (feedback -> dataset -> LoRA -> gate -> canary -> promotion / rollback)
    adapters_dir: Path = Path("var/adapters")  # shared with vLLM in production
    learn_runs_dir: Path = Path("var/runs")  # datasets, logs and TensorBoard events per run
    learn_adapter_prefix: str = "fb"
    learn_min_feedback: int = Field(default=50, ge=1)  # new eligible feedback before a run
    learn_min_interval_s: float = Field(default=3600, ge=0)
    learn_check_interval_s: float = Field(default=300, gt=0)
    learn_cron: str | None = "0 3 * * 0"  # a periodic run (crontab); empty: none
    learn_incremental: bool = True  # continue from the active adapter (else from the base)
    learn_heldout_percent: int = Field(default=20, ge=0, le=100)
    learn_min_voters: int = Field(default=2, ge=1)
    learn_per_user_cap: int = Field(default=50, ge=1)
    learn_include_liked: bool = True
    learn_replay_fraction: float = Field(default=0.5, ge=0)
    learn_redact_patterns: dict[str, str] = Field(default_factory=dict)  # NAME -> regex
    learn_redact_allow: list[str] = Field(default_factory=list)  # strings / @domains to keep
    # the defaults are the training job's (feedback/train.py), as benchmarks/feedback_loop.py
    # measured them
    learn_rank: int = Field(default=16, ge=1)
    learn_epochs: float = Field(default=3.0, gt=0)
    learn_learning_rate: float = Field(default=2e-3, gt=0)
    learn_batch_size: int = Field(default=8, ge=1)
    learn_max_length: int = Field(default=384, ge=32)
    learn_kto_min_examples: int = Field(default=16, ge=1)
    learn_neftune_alpha: float = Field(default=0.0, ge=0)  # NEFTune noise in SFT; 0: off
    learn_augment: int = Field(default=2, ge=0)  # noisy copies of each trained question
    # bf16 autocast while training where the hardware has native bf16 ("auto"), or forced
    learn_precision: Literal["auto", "bf16", "fp32"] = "auto"
    # The training worker's command line (the job file is appended); empty: this Python's
    # `-m feedback.train`. On a GPU host, e.g. "accelerate launch --num_processes 1
    # -m feedback.train" (one process: the worker does not shard).
    learn_train_command: str = ""
    learn_golden_margin: float = Field(default=0.05, ge=0)
    learn_canary_percent: float = Field(default=10.0, ge=0, le=100)
    learn_canary_min_votes: int = Field(default=30, ge=1)
    learn_canary_max_votes: int = Field(default=300, ge=1)
    learn_canary_margin: float = Field(default=0.05, ge=0)
    learn_canary_interval_s: float = Field(default=300, gt=0)
    learn_lease_ttl_s: float = Field(default=60, gt=0)
    learn_drain_s: float = Field(default=120, ge=0)  # before unloading a retired adapter

    # Telegram (on when TELEGRAM_BOT_TOKEN is set)
    telegram_bot_token: SecretStr | None = Field(default=None, alias="TELEGRAM_BOT_TOKEN")
    telegram_mode: str = "polling"  # or "webhook"
    telegram_webhook_url: str | None = None
    telegram_webhook_secret: SecretStr | None = None
    telegram_api_base: str | None = None  # another Bot API server (self-hosted, or a test fake)
    telegram_draft_interval_s: float = Field(default=1.0, ge=0)  # private chats: draft updates
    telegram_edit_interval_s: float = Field(default=3.0, ge=0)  # groups: edits (~20/min/group)
    telegram_poll_timeout_s: int = Field(default=25, ge=0, le=50)
    telegram_drain_s: float = Field(default=20.0, ge=0)  # on shutdown: finish answers in progress

    # Slack (on when SLACK_BOT_TOKEN is set)
    slack_bot_token: SecretStr | None = Field(default=None, alias="SLACK_BOT_TOKEN")
    slack_signing_secret: SecretStr | None = Field(default=None, alias="SLACK_SIGNING_SECRET")
    slack_app_token: SecretStr | None = Field(default=None, alias="SLACK_APP_TOKEN")
    slack_api_base: str | None = None  # another Web API base URL (a test fake)
    slack_streaming: bool = True  # chat.startStream/appendStream/stopStream, else chat.update
    slack_update_interval_s: float = Field(default=1.0, ge=0)  # between edits of one message
    slack_updates_per_minute: int = Field(default=50, ge=1)  # progress edits per workspace
    slack_message_chars: int = Field(default=3000, ge=100, le=3000)  # longer answers split
    slack_agent_corrections: bool = False  # reviewers replying after the bot = corrections

    @field_validator("database_url")
    @classmethod
    def _url_has_scheme(cls, v: str) -> str:
        if "://" not in v:
            raise ValueError("must be a URL such as sqlite:///var/chatloop.db or postgresql://...")
        return v

    @field_validator("learn_train_command")
    @classmethod
    def _command_exists(cls, v: str) -> str:
        words = shlex.split(v)
        if words and shutil.which(words[0]) is None:
            raise ValueError(f"{words[0]!r} is not an executable on PATH")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _fits_context(cls, v: int, info: object) -> int:
        ctx = getattr(info, "data", {}).get("context_tokens", 2048)
        if v >= ctx:
            raise ValueError(f"must be below CHATLOOP_CONTEXT_TOKENS ({ctx})")
        return v
