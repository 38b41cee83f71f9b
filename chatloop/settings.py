"""The one settings object (environment variables and `.env`), read only by the composition root."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, concise customer-service assistant. Answer the user's question "
    "clearly in a few sentences. If you do not know, say so."
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CHATLOOP_", env_file=".env", extra="ignore", populate_by_name=True
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

    @field_validator("max_tokens")
    @classmethod
    def _fits_context(cls, v: int, info: object) -> int:
        ctx = getattr(info, "data", {}).get("context_tokens", 2048)
        if v >= ctx:
            raise ValueError(f"must be below CHATLOOP_CONTEXT_TOKENS ({ctx})")
        return v
