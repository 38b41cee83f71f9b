"""The settings (environment variables and `.env`), in sections; read only by the composition root.

Each section is its own `BaseSettings` that reads its own variables: `CHATLOOP_` + the field
name, or `CHATLOOP_TELEGRAM_` + name and so on, or the one name a field declares as its alias
(`TELEGRAM_BOT_TOKEN`, `CHATLOOP_INFERENCE_URL`). `Settings` holds one of each:
`settings.core.max_tokens` is `CHATLOOP_MAX_TOKENS`, `settings.telegram.bot_token` is
`TELEGRAM_BOT_TOKEN`. `env_names()` lists every variable and what it sets.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.sources import ENV_FILE_SENTINEL, DotenvType

if TYPE_CHECKING:
    from feedback.redaction import MemoryEntry, Redactor

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, concise customer-service assistant. Answer the user's question "
    "clearly in a few sentences. If you do not know, say so."
)


class Section(BaseSettings):
    """One group of settings, read from the environment and `.env` (init values first)."""

    model_config = SettingsConfigDict(
        env_prefix="CHATLOOP_", env_file=".env", extra="ignore",
        env_ignore_empty=True,  # TOKEN= (as compose writes an unset variable) means unset
    )

    def __init__(self, **values: Any) -> None:
        # Code passes field names; a field with an alias validates by that alias only, so that
        # the environment sets it by exactly that name (populate_by_name would also read
        # prefix + field name, e.g. CHATLOOP_URL).
        aliases = _aliases(type(self))
        super().__init__(**{aliases.get(k, k): v for k, v in values.items()})


def _aliases(section: type[BaseSettings]) -> dict[str, str]:
    return {name: f.validation_alias for name, f in section.model_fields.items()
            if isinstance(f.validation_alias, str)}


class StorageSettings(Section):
    database_url: str = "sqlite+aiosqlite:///var/chatloop.db"
    # delete conversations (messages, feedback, event payloads, dataset rows) older than
    # this, every day (the scheduler's leader); unset: kept
    retention_days: int | None = Field(default=None, ge=1)

    @field_validator("database_url")
    @classmethod
    def _url_has_scheme(cls, v: str) -> str:
        if "://" not in v:
            raise ValueError("must be a URL such as sqlite:///var/chatloop.db or postgresql://...")
        return v


class GatewaySettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # /metrics of the gateway and the trainer, on `host`, never on the public port; 0: off
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    log_format: Literal["text", "json"] = "text"


class WebChatSettings(Section):
    model_config = SettingsConfigDict(env_prefix="CHATLOOP_WEBCHAT_")

    enabled: bool = False  # under `chatloop serve` (the demo always has it)
    token: SecretStr | None = None
    # signs the cookie carrying each browser's identity; required under `serve`, the demo
    # keeps one in var/webchat-secret
    secret: SecretStr | None = Field(default=None, min_length=16)


class ConsoleSettings(Section):
    """The operator console under /console (bots/console): off unless enabled."""

    model_config = SettingsConfigDict(env_prefix="CHATLOOP_CONSOLE_")

    enabled: bool = False
    # behind an SSO proxy: the header naming the signed-in operator, believed only from
    # trusted_proxies (addresses or networks, e.g. '["10.0.0.5","172.16.0.0/12"]')
    user_header: str | None = None
    trusted_proxies: list[str] = Field(default_factory=list)
    session_hours: float = Field(default=8.0, gt=0, le=24 * 30)
    login_attempts: int = Field(default=5, ge=1)  # failed sign-ins per 5 minutes per address

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for net in v:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad one
        return v


class InferenceSettings(Section):
    # an OpenAI-compatible /v1 endpoint, or several comma-separated (vLLM replicas: each gets
    # every adapter, a conversation stays on one); unset = the embedded engine on `model`
    url: str | None = Field(default=None, validation_alias="CHATLOOP_INFERENCE_URL")
    api_key: SecretStr = Field(default=SecretStr("EMPTY"),
                               validation_alias="CHATLOOP_INFERENCE_API_KEY")
    served_model_name: str = "chatloop-base"
    model: str = "var/models/SmolLM2-135M-Instruct"
    model_source: str = "bundled"
    model_cache: Path = Path("var/cache")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=2, ge=0)
    max_lora_rank: int = Field(default=16, ge=1)
    adapter: str | None = None  # serve this adapter to every conversation (not the registry's)
    # the embedded engine: weights' precision ("auto": bf16 where native; fp32 by default, as the
    # learning loop's parity reference), rows decoded together,
    # KV cache tokens reserved by them (prompt + max_tokens each); more requests queue; the
    # intra-op threads of a decoding step of several rows (0: torch's count, as prefill); a copy
    # of the linear weights reordered for decoding steps (twice the weights' memory)
    embedded_precision: Literal["auto", "bf16", "fp32"] = "fp32"
    embedded_max_batch: int = Field(default=32, ge=1)
    embedded_max_kv_tokens: int = Field(default=16384, ge=256)
    embedded_decode_threads: int = Field(default=1, ge=0)
    embedded_packed_weights: bool = True

    @field_validator("url")
    @classmethod
    def _urls(cls, v: str | None) -> str | None:
        for url in v.split(",") if v is not None else ():
            parts = urlsplit(url.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url.strip()!r} is not an http(s) URL such as "
                                 "http://vllm:8000/v1 (several: comma-separated)")
        return v

    @property
    def urls(self) -> list[str]:
        """The endpoints of CHATLOOP_INFERENCE_URL (none: the embedded engine)."""
        return [u.strip() for u in (self.url or "").split(",") if u.strip()]


class CoreSettings(Section):
    """The conversation core: prompt, limits, reviewers, event leases."""

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    context_tokens: int = Field(default=2048, ge=128)
    max_tokens: int = Field(default=256, ge=1)  # checked against context_tokens (declared first)
    max_input_chars: int = Field(default=4000, ge=1)
    history_messages: int = Field(default=20, ge=0)
    rate_limit_per_minute: int = Field(default=20, ge=1)
    max_concurrent_generations: int = Field(default=32, ge=1)
    # identities (`channel:id`) whose corrections are trusted: telegram:USER, slack:TEAM/USER
    reviewers: list[str] = Field(default_factory=list)
    # the retired CHATLOOP_REVIEWER_IDS: refused, saying how to write CHATLOOP_REVIEWERS
    retired_reviewer_ids: Any = Field(default=None, validation_alias="CHATLOOP_REVIEWER_IDS",
                                      exclude=True, json_schema_extra={"retired": True})
    # replicas: a process holds the events it works on for this long, renewed while it runs;
    # a crashed process's unfinished turns are taken over by another after it
    event_lease_s: float = Field(default=30.0, gt=0)
    replica_id: str | None = None  # default: host name and process id

    @field_validator("reviewers")
    @classmethod
    def _are_identities(cls, v: list[str]) -> list[str]:
        for who in v:
            channel, _, user = who.partition(":")
            if channel == "web":
                raise ValueError(f"{who!r}: web identities are never reviewers (the web chat "
                                 "issues one to every browser)")
            if channel not in _REVIEWER_FORMS or not re.fullmatch(_REVIEWER_FORMS[channel], user):
                raise ValueError(f"{who!r} is not telegram:USER_ID or slack:TEAM_ID/USER_ID")
        return v

    @field_validator("retired_reviewer_ids", mode="before")
    @classmethod
    def _retired(cls, v: Any) -> None:
        if v is not None:  # the default is validated too
            raise ValueError(retired_reviewer_ids_message(v))

    @field_validator("max_tokens")
    @classmethod
    def _fits_context(cls, v: int, info: ValidationInfo) -> int:
        ctx = info.data.get("context_tokens", 2048)
        if v >= ctx:
            raise ValueError(f"must be below CHATLOOP_CONTEXT_TOKENS ({ctx})")
        return v


_REVIEWER_FORMS = {"telegram": r"\d+", "slack": r"[A-Z0-9]+/[A-Z0-9]+"}


def retired_reviewer_ids_message(old: Any) -> str:
    """What to write instead of CHATLOOP_REVIEWER_IDS, with its ids as identities: digits
    are Telegram users, others Slack users whose team (TEAM_ID, T...) must be filled in."""
    try:
        ids = [str(i) for i in (json.loads(old) if isinstance(old, str) else old)]
    except (TypeError, ValueError):
        ids = []
    example = [f"telegram:{i}" if i.isdigit() else f"slack:TEAM_ID/{i}" for i in ids]
    return ("no longer read: reviewers are identities (channel:id); remove it and set "
            "CHATLOOP_REVIEWERS='"
            + json.dumps(example or ["telegram:111", "slack:T0/U0ABC"]) + "'")


class MemorySettings(Section):
    """The answer memory: approved answers used at once (bots.core.memory)."""

    model_config = SettingsConfigDict(env_prefix="CHATLOOP_MEMORY_")

    enabled: bool = True
    # minilm (all-MiniLM-L6-v2, written to var/models by `chatloop model prepare`; its int8
    # copy where the CPU has int8 dot products), minilm-int8 or minilm-fp32 (either, each
    # also :DIR), minilm:DIR, wordllama (offline, in its wheel), wordllama:CONFIG:DIM, hf:PATH
    embedder: str = "minilm"
    # similarity above which an approved answer is sent as it is, and from which the best
    # entries are quoted in the prompt; unset: the embedder's calibrated values
    # (inference.memory.CALIBRATED, docs/benchmarks.md#answer-memory)
    answer_threshold: float | None = Field(default=None, gt=0)
    reference_threshold: float | None = Field(default=None, gt=0)
    max_references: int = Field(default=3, ge=1, le=10)
    refresh_s: float = Field(default=1.0, gt=0)  # how stale a replica's index may get

    def thresholds(self) -> tuple[float, float]:
        """(answer, reference): as set, else calibrated for the embedder."""
        from inference.memory import thresholds

        return thresholds(self.embedder, self.answer_threshold, self.reference_threshold)


class HandoffSettings(Section):
    """Human hand-off (bots.core.handoff): where agents work is per channel
    (CHATLOOP_TELEGRAM_AGENTS_CHAT, CHATLOOP_SLACK_HANDOFF_CHANNEL)."""

    model_config = SettingsConfigDict(env_prefix="CHATLOOP_HANDOFF_")

    phrases: list[str] = Field(default_factory=lambda: [
        "talk to a person", "talk to a human", "speak to a person", "speak to a human",
        "human agent", "real person", "live agent"])
    after_downvotes: int = Field(default=0, ge=0)  # 👎 in a conversation, then a person; 0: off
    idle_s: float = Field(default=1800, gt=0)  # held without agent messages: back to the bot
    wait_s: float = Field(default=600, gt=0)  # waiting this long: an apology (once)
    hours: str | None = None  # support hours, e.g. "Mon-Fri 09:00-17:00"; unset: always
    timezone: str = "UTC"  # the support hours' time zone
    ticket_url: str | None = None  # offered with the apology after wait_s
    expected_wait: str = "a few minutes"  # what users are told


class LearnSettings(Section):
    """The learning loop: feedback -> dataset -> LoRA -> gate -> canary -> promotion / rollback."""

    model_config = SettingsConfigDict(env_prefix="CHATLOOP_LEARN_")

    # shared with vLLM in production
    adapters_dir: Path = Field(default=Path("var/adapters"),
                               validation_alias="CHATLOOP_ADAPTERS_DIR")
    runs_dir: Path = Path("var/runs")  # datasets, logs and TensorBoard events per run
    # adapter names (PREFIX-vN) are directory names: one safe path segment
    adapter_prefix: str = Field(default="fb", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
    min_feedback: int = Field(default=50, ge=1)  # new eligible feedback before a run
    min_interval_s: float = Field(default=3600, ge=0)
    check_interval_s: float = Field(default=300, gt=0)
    cron: str | None = "0 3 * * 0"  # a periodic run (crontab); empty: none
    incremental: bool = True  # continue from the active adapter (else from the base)
    heldout_percent: int = Field(default=20, ge=0, le=100)
    # conversations with votes only held out for the gate of a votes-only run
    heldout_votes_percent: int = Field(default=20, ge=0, le=100)
    min_voters: int = Field(default=2, ge=1)
    per_user_cap: int = Field(default=50, ge=1)
    # how much an untrusted web vote counts, in labels and in the canary (anyone can open a
    # browser); 0: web votes make no label (`chatloop demo` sets 1 unless this is set)
    web_vote_weight: float = Field(default=0.0, ge=0)
    include_liked: bool = True
    replay_fraction: float = Field(default=0.5, ge=0)
    redact_patterns: dict[str, str] = Field(default_factory=dict)  # NAME -> regex
    redact_allow: list[str] = Field(default_factory=list)  # strings / @domains to keep
    # the defaults are the training job's (feedback/train.py), as benchmarks/feedback_loop.py
    # measured them
    rank: int = Field(default=16, ge=1)
    epochs: float = Field(default=3.0, gt=0)
    learning_rate: float = Field(default=2e-3, gt=0)
    batch_size: int = Field(default=8, ge=1)
    max_length: int = Field(default=384, ge=32)
    kto_min_examples: int = Field(default=16, ge=1)
    neftune_alpha: float = Field(default=0.0, ge=0)  # NEFTune noise in SFT; 0: off
    augment: int = Field(default=2, ge=0)  # noisy copies of each trained question
    # each correction once more with the answer memory's quotes in its prompt (RAFT)
    reference_copies: bool = True
    # bf16 autocast while training where the hardware has native bf16 ("auto"), or forced
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # The training worker's command line (the job file is appended); empty: this Python's
    # `-m feedback.train`. On a GPU host, e.g. "accelerate launch --num_processes 1
    # -m feedback.train" (one process: the worker does not shard).
    train_command: str = ""
    golden_margin: float = Field(default=0.05, ge=0)
    dpo_min_pairs: int = Field(default=8, ge=1)  # hand-off preference pairs before DPO runs
    # no held-out correction (every answer corrected once): judge on rephrasings of the
    # trained questions instead of skipping the run
    gate_rephrasings: bool = True
    # once a candidate passes the gate, train the recipe again on every correction, the held-out
    # ones too, and ship that (the golden-set loss re-checked); false: they wait for the next run
    settle_heldout: bool = True
    canary_percent: float = Field(default=10.0, ge=0, le=100)
    canary_min_votes: int = Field(default=30, ge=1)
    canary_max_votes: int = Field(default=300, ge=1)
    canary_margin: float = Field(default=0.05, ge=0)
    canary_interval_s: float = Field(default=300, gt=0)
    lease_ttl_s: float = Field(default=60, gt=0)
    drain_s: float = Field(default=120, ge=0)  # before unloading a retired adapter

    @field_validator("train_command")
    @classmethod
    def _command_exists(cls, v: str) -> str:
        words = shlex.split(v)
        if words and shutil.which(words[0]) is None:
            raise ValueError(f"{words[0]!r} is not an executable on PATH")
        return v

    def redactor(self) -> Redactor:
        """The redaction of what customers wrote (CHATLOOP_LEARN_REDACT_*): in training data
        and in the answer memory's served answers."""
        from feedback.redaction import Redactor

        return Redactor(patterns=self.redact_patterns, allow=frozenset(self.redact_allow))

    def memory_voice(self) -> Callable[[MemoryEntry], str | None]:
        """An answer-memory entry's answer as the gateway serves it; None where it is not
        served at all (it repeats the asker's details: feedback.redaction.served)."""
        from feedback.redaction import served

        return partial(served, self.redactor())


class TelegramSettings(Section):
    """The Telegram channel, on when TELEGRAM_BOT_TOKEN is set."""

    model_config = SettingsConfigDict(env_prefix="CHATLOOP_TELEGRAM_")

    bot_token: SecretStr | None = Field(default=None, validation_alias="TELEGRAM_BOT_TOKEN")
    mode: str = "polling"  # or "webhook"
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    api_base: str | None = None  # another Bot API server (self-hosted, or a test fake)
    draft_interval_s: float = Field(default=1.0, ge=0)  # private chats: draft updates
    edit_interval_s: float = Field(default=3.0, ge=0)  # groups: edits (~20/min/group)
    # the bot's messages, edits and drafts a second, all replicas together (Telegram: about
    # 30; more with paid broadcasts)
    sends_per_s: float = Field(default=20.0, gt=0)
    poll_timeout_s: int = Field(default=25, ge=0, le=50)
    drain_s: float = Field(default=20.0, ge=0)  # on shutdown: finish answers in progress
    agents_chat: int | None = None  # hand-off: the agents' forum supergroup (one topic a user)


class SlackSettings(Section):
    """The Slack channel, on when SLACK_BOT_TOKEN is set."""

    model_config = SettingsConfigDict(env_prefix="CHATLOOP_SLACK_")

    bot_token: SecretStr | None = Field(default=None, validation_alias="SLACK_BOT_TOKEN")
    signing_secret: SecretStr | None = Field(default=None,
                                             validation_alias="SLACK_SIGNING_SECRET")
    app_token: SecretStr | None = Field(default=None, validation_alias="SLACK_APP_TOKEN")
    api_base: str | None = None  # another Web API base URL (a test fake)
    streaming: bool = True  # chat.startStream/appendStream/stopStream, else chat.update
    update_interval_s: float = Field(default=1.0, ge=0)  # between edits of one message
    updates_per_minute: int = Field(default=50, ge=1)  # progress edits per workspace
    message_chars: int = Field(default=3000, ge=100, le=3000)  # longer answers split
    agent_corrections: bool = False  # reviewers replying after the bot = corrections
    handoff_channel: str | None = None  # hand-off: the agents' channel id (escalations)


class Settings(BaseModel):
    """Every section. `Settings()` reads the environment and `.env` (`_env_file=None`: not
    `.env`); `Settings(core={"max_tokens": 48})` sets some fields, the rest still read."""

    model_config = ConfigDict(extra="forbid")  # a misspelt section fails here

    storage: StorageSettings
    gateway: GatewaySettings
    webchat: WebChatSettings
    console: ConsoleSettings
    inference: InferenceSettings
    core: CoreSettings
    learn: LearnSettings
    memory: MemorySettings
    handoff: HandoffSettings
    telegram: TelegramSettings
    slack: SlackSettings

    def __init__(self, _env_file: DotenvType | None = ENV_FILE_SENTINEL,
                 **sections: Any) -> None:
        for name, field in type(self).model_fields.items():
            given = sections.get(name, {})
            if isinstance(given, Mapping):
                sections[name] = field.annotation(_env_file=_env_file, **given)  # type: ignore[misc]
        super().__init__(**sections)

    @classmethod
    def from_env_names(cls, _env_file: DotenvType | None = ENV_FILE_SENTINEL,
                       **values: Any) -> Settings:
        """Settings with values given by variable name, case-insensitive, the `CHATLOOP_`
        prefix optional: `from_env_names(max_tokens=48, slack_bot_token="xoxb-1")`."""
        names = env_names()
        sections: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            where = names.get(key.upper()) or names.get("CHATLOOP_" + key.upper())
            if where is None:
                raise TypeError(f"no setting is named {key!r}")
            sections.setdefault(where[0], {})[where[1]] = value
        return cls(_env_file, **sections)


def section_env_names(section: type[BaseSettings]) -> dict[str, str]:
    """A section's field names -> the environment variables that set them (retired variables,
    read only to be refused, are not settings)."""
    prefix = section.model_config.get("env_prefix", "")
    aliases = _aliases(section)
    return {name: aliases.get(name, (prefix + name).upper())
            for name, f in section.model_fields.items()
            if not (isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("retired"))}


def env_names() -> dict[str, tuple[str, str]]:
    """Every environment variable -> the (section, field) it sets."""
    return {env: (section, name)
            for section, field in Settings.model_fields.items()
            for name, env in section_env_names(field.annotation).items()}  # type: ignore[arg-type]


def describe_error(exc: ValidationError) -> str:
    """`CHATLOOP_PORT: Input should be ...`: the first error, named by its variable."""
    err = exc.errors()[0]
    sections = {f.annotation.__name__: f.annotation for f in Settings.model_fields.values()}  # type: ignore[union-attr]
    section = sections.get(exc.title)
    name = str(err["loc"][0]) if err["loc"] else "settings"
    if section is not None:
        names = section_env_names(section)  # type: ignore[arg-type]
        name = names.get(name, name)
    return f"{name}: {err['msg']}"
