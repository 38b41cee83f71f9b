"""Configuration: every variable sets what it always did; the defaults are the benchmarks'."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from chatloop.app import loop_config
from chatloop.settings import Settings, describe_error, env_names
from feedback.train import TrainJob, trains_in_bf16

TRAIN_COMMAND = f"{sys.executable} -m feedback.train"  # an executable on PATH or a path

# Every documented environment variable (README.md, .env.example), a sample value, the
# attribute it sets and the value that attribute then has.
VARIABLES: list[tuple[str, str, str, Any]] = [
    ("CHATLOOP_DATABASE_URL", "postgresql://u@h/db", "storage.database_url",
     "postgresql://u@h/db"),
    ("CHATLOOP_RETENTION_DAYS", "30", "storage.retention_days", 30),
    ("CHATLOOP_HOST", "0.0.0.0", "gateway.host", "0.0.0.0"),
    ("CHATLOOP_PORT", "8123", "gateway.port", 8123),
    ("CHATLOOP_METRICS_PORT", "9100", "gateway.metrics_port", 9100),
    ("CHATLOOP_LOG_FORMAT", "json", "gateway.log_format", "json"),
    ("CHATLOOP_WEBCHAT_ENABLED", "true", "webchat.enabled", True),
    ("CHATLOOP_WEBCHAT_TOKEN", "web-secret", "webchat.token", "web-secret"),
    ("CHATLOOP_WEBCHAT_SECRET", "k" * 32, "webchat.secret", "k" * 32),
    ("CHATLOOP_CONSOLE_ENABLED", "true", "console.enabled", True),
    ("CHATLOOP_CONSOLE_USER_HEADER", "X-Forwarded-User", "console.user_header",
     "X-Forwarded-User"),
    ("CHATLOOP_CONSOLE_TRUSTED_PROXIES", '["10.0.0.0/8"]', "console.trusted_proxies",
     ["10.0.0.0/8"]),
    ("CHATLOOP_CONSOLE_SESSION_HOURS", "2", "console.session_hours", 2.0),
    ("CHATLOOP_CONSOLE_LOGIN_ATTEMPTS", "9", "console.login_attempts", 9),
    ("CHATLOOP_INFERENCE_URL", "http://vllm:8001/v1", "inference.url", "http://vllm:8001/v1"),
    ("CHATLOOP_INFERENCE_API_KEY", "vllm-key", "inference.api_key", "vllm-key"),
    ("CHATLOOP_SERVED_MODEL_NAME", "base-7b", "inference.served_model_name", "base-7b"),
    ("CHATLOOP_MODEL", "/models/m", "inference.model", "/models/m"),
    ("CHATLOOP_MODEL_SOURCE", "org/model", "inference.model_source", "org/model"),
    ("CHATLOOP_MODEL_CACHE", "/cache", "inference.model_cache", Path("/cache")),
    ("CHATLOOP_CONNECT_TIMEOUT_S", "1.5", "inference.connect_timeout_s", 1.5),
    ("CHATLOOP_READ_TIMEOUT_S", "90", "inference.read_timeout_s", 90.0),
    ("CHATLOOP_MAX_RETRIES", "5", "inference.max_retries", 5),
    ("CHATLOOP_MAX_LORA_RANK", "64", "inference.max_lora_rank", 64),
    ("CHATLOOP_ADAPTER", "fb-v3", "inference.adapter", "fb-v3"),
    ("CHATLOOP_EMBEDDED_PRECISION", "auto", "inference.embedded_precision", "auto"),
    ("CHATLOOP_EMBEDDED_MAX_BATCH", "8", "inference.embedded_max_batch", 8),
    ("CHATLOOP_EMBEDDED_MAX_KV_TOKENS", "4096", "inference.embedded_max_kv_tokens", 4096),
    ("CHATLOOP_EMBEDDED_DECODE_THREADS", "0", "inference.embedded_decode_threads", 0),
    ("CHATLOOP_EMBEDDED_PACKED_WEIGHTS", "false", "inference.embedded_packed_weights", False),
    ("CHATLOOP_SYSTEM_PROMPT", "Be brief.", "core.system_prompt", "Be brief."),
    ("CHATLOOP_CONTEXT_TOKENS", "4096", "core.context_tokens", 4096),
    ("CHATLOOP_MAX_TOKENS", "100", "core.max_tokens", 100),
    ("CHATLOOP_MAX_INPUT_CHARS", "500", "core.max_input_chars", 500),
    ("CHATLOOP_HISTORY_MESSAGES", "4", "core.history_messages", 4),
    ("CHATLOOP_RATE_LIMIT_PER_MINUTE", "7", "core.rate_limit_per_minute", 7),
    ("CHATLOOP_MAX_CONCURRENT_GENERATIONS", "3", "core.max_concurrent_generations", 3),
    ("CHATLOOP_REVIEWERS", '["slack:T0/U0ABC", "telegram:111"]', "core.reviewers",
     ["slack:T0/U0ABC", "telegram:111"]),
    ("CHATLOOP_EVENT_LEASE_S", "2.5", "core.event_lease_s", 2.5),
    ("CHATLOOP_REPLICA_ID", "gw-1", "core.replica_id", "gw-1"),
    ("CHATLOOP_ADAPTERS_DIR", "/adapters", "learn.adapters_dir", Path("/adapters")),
    ("CHATLOOP_LEARN_RUNS_DIR", "/runs", "learn.runs_dir", Path("/runs")),
    ("CHATLOOP_MEMORY_ENABLED", "false", "memory.enabled", False),
    ("CHATLOOP_MEMORY_EMBEDDER", "hf:/models/e5", "memory.embedder", "hf:/models/e5"),
    ("CHATLOOP_MEMORY_ANSWER_THRESHOLD", "0.9", "memory.answer_threshold", 0.9),
    ("CHATLOOP_MEMORY_REFERENCE_THRESHOLD", "0.5", "memory.reference_threshold", 0.5),
    ("CHATLOOP_MEMORY_MAX_REFERENCES", "5", "memory.max_references", 5),
    ("CHATLOOP_MEMORY_REFRESH_S", "2.5", "memory.refresh_s", 2.5),
    ("CHATLOOP_LEARN_ADAPTER_PREFIX", "cs", "learn.adapter_prefix", "cs"),
    ("CHATLOOP_LEARN_MIN_FEEDBACK", "9", "learn.min_feedback", 9),
    ("CHATLOOP_LEARN_MIN_INTERVAL_S", "61", "learn.min_interval_s", 61.0),
    ("CHATLOOP_LEARN_CHECK_INTERVAL_S", "31", "learn.check_interval_s", 31.0),
    ("CHATLOOP_LEARN_CRON", "0 4 * * *", "learn.cron", "0 4 * * *"),
    ("CHATLOOP_LEARN_INCREMENTAL", "false", "learn.incremental", False),
    ("CHATLOOP_LEARN_HELDOUT_PERCENT", "25", "learn.heldout_percent", 25),
    ("CHATLOOP_LEARN_MIN_VOTERS", "3", "learn.min_voters", 3),
    ("CHATLOOP_LEARN_PER_USER_CAP", "11", "learn.per_user_cap", 11),
    ("CHATLOOP_LEARN_WEB_VOTE_WEIGHT", "0.5", "learn.web_vote_weight", 0.5),
    ("CHATLOOP_LEARN_INCLUDE_LIKED", "false", "learn.include_liked", False),
    ("CHATLOOP_LEARN_REPLAY_FRACTION", "0.25", "learn.replay_fraction", 0.25),
    ("CHATLOOP_LEARN_REDACT_PATTERNS", r'{"ORDER": "#\\d+"}', "learn.redact_patterns",
     {"ORDER": r"#\d+"}),
    ("CHATLOOP_LEARN_REDACT_ALLOW", '["@example.com"]', "learn.redact_allow",
     ["@example.com"]),
    ("CHATLOOP_LEARN_RANK", "8", "learn.rank", 8),
    ("CHATLOOP_LEARN_EPOCHS", "1.5", "learn.epochs", 1.5),
    ("CHATLOOP_LEARN_LEARNING_RATE", "1e-4", "learn.learning_rate", 1e-4),
    ("CHATLOOP_LEARN_BATCH_SIZE", "4", "learn.batch_size", 4),
    ("CHATLOOP_LEARN_MAX_LENGTH", "256", "learn.max_length", 256),
    ("CHATLOOP_LEARN_KTO_MIN_EXAMPLES", "6", "learn.kto_min_examples", 6),
    ("CHATLOOP_LEARN_NEFTUNE_ALPHA", "5", "learn.neftune_alpha", 5.0),
    ("CHATLOOP_LEARN_AUGMENT", "0", "learn.augment", 0),
    ("CHATLOOP_LEARN_REFERENCE_COPIES", "false", "learn.reference_copies", False),
    ("CHATLOOP_LEARN_PRECISION", "fp32", "learn.precision", "fp32"),
    ("CHATLOOP_LEARN_TRAIN_COMMAND", TRAIN_COMMAND, "learn.train_command", TRAIN_COMMAND),
    ("CHATLOOP_LEARN_GOLDEN_MARGIN", "0.1", "learn.golden_margin", 0.1),
    ("CHATLOOP_LEARN_GATE_REPHRASINGS", "false", "learn.gate_rephrasings", False),
    ("CHATLOOP_LEARN_SETTLE_HELDOUT", "false", "learn.settle_heldout", False),
    ("CHATLOOP_LEARN_CANARY_PERCENT", "12.5", "learn.canary_percent", 12.5),
    ("CHATLOOP_LEARN_CANARY_MIN_VOTES", "5", "learn.canary_min_votes", 5),
    ("CHATLOOP_LEARN_CANARY_MAX_VOTES", "500", "learn.canary_max_votes", 500),
    ("CHATLOOP_LEARN_CANARY_MARGIN", "0.02", "learn.canary_margin", 0.02),
    ("CHATLOOP_LEARN_CANARY_INTERVAL_S", "33", "learn.canary_interval_s", 33.0),
    ("CHATLOOP_LEARN_LEASE_TTL_S", "15", "learn.lease_ttl_s", 15.0),
    ("CHATLOOP_LEARN_DRAIN_S", "7", "learn.drain_s", 7.0),
    ("TELEGRAM_BOT_TOKEN", "123:abc", "telegram.bot_token", "123:abc"),
    ("CHATLOOP_TELEGRAM_MODE", "webhook", "telegram.mode", "webhook"),
    ("CHATLOOP_TELEGRAM_WEBHOOK_URL", "https://bot.example.com/telegram/webhook",
     "telegram.webhook_url", "https://bot.example.com/telegram/webhook"),
    ("CHATLOOP_TELEGRAM_WEBHOOK_SECRET", "hook_secret", "telegram.webhook_secret",
     "hook_secret"),
    ("CHATLOOP_TELEGRAM_API_BASE", "http://tg:8081", "telegram.api_base", "http://tg:8081"),
    ("CHATLOOP_TELEGRAM_DRAFT_INTERVAL_S", "0.5", "telegram.draft_interval_s", 0.5),
    ("CHATLOOP_TELEGRAM_EDIT_INTERVAL_S", "4", "telegram.edit_interval_s", 4.0),
    ("CHATLOOP_TELEGRAM_SENDS_PER_S", "250", "telegram.sends_per_s", 250.0),
    ("CHATLOOP_TELEGRAM_POLL_TIMEOUT_S", "10", "telegram.poll_timeout_s", 10),
    ("CHATLOOP_TELEGRAM_DRAIN_S", "3", "telegram.drain_s", 3.0),
    ("SLACK_BOT_TOKEN", "xoxb-1", "slack.bot_token", "xoxb-1"),
    ("SLACK_SIGNING_SECRET", "signing", "slack.signing_secret", "signing"),
    ("SLACK_APP_TOKEN", "xapp-1", "slack.app_token", "xapp-1"),
    ("CHATLOOP_SLACK_API_BASE", "http://slack:9", "slack.api_base", "http://slack:9"),
    ("CHATLOOP_SLACK_STREAMING", "false", "slack.streaming", False),
    ("CHATLOOP_SLACK_UPDATE_INTERVAL_S", "2", "slack.update_interval_s", 2.0),
    ("CHATLOOP_SLACK_UPDATES_PER_MINUTE", "20", "slack.updates_per_minute", 20),
    ("CHATLOOP_SLACK_MESSAGE_CHARS", "1000", "slack.message_chars", 1000),
    ("CHATLOOP_SLACK_AGENT_CORRECTIONS", "true", "slack.agent_corrections", True),
    ("CHATLOOP_SLACK_HANDOFF_CHANNEL", "C0AGENTS", "slack.handoff_channel", "C0AGENTS"),
    ("CHATLOOP_TELEGRAM_AGENTS_CHAT", "-100777", "telegram.agents_chat", -100777),
    ("CHATLOOP_HANDOFF_PHRASES", '["agent please"]', "handoff.phrases", ["agent please"]),
    ("CHATLOOP_HANDOFF_AFTER_DOWNVOTES", "2", "handoff.after_downvotes", 2),
    ("CHATLOOP_HANDOFF_IDLE_S", "60", "handoff.idle_s", 60.0),
    ("CHATLOOP_HANDOFF_WAIT_S", "30", "handoff.wait_s", 30.0),
    ("CHATLOOP_HANDOFF_HOURS", "Mon-Fri 09:00-17:00", "handoff.hours", "Mon-Fri 09:00-17:00"),
    ("CHATLOOP_HANDOFF_TIMEZONE", "Europe/Berlin", "handoff.timezone", "Europe/Berlin"),
    ("CHATLOOP_HANDOFF_TICKET_URL", "https://help.example.com/new", "handoff.ticket_url",
     "https://help.example.com/new"),
    ("CHATLOOP_HANDOFF_EXPECTED_WAIT", "an hour", "handoff.expected_wait", "an hour"),
    ("CHATLOOP_LEARN_DPO_MIN_PAIRS", "3", "learn.dpo_min_pairs", 3),
    ("CHATLOOP_LEARN_HELDOUT_VOTES_PERCENT", "30", "learn.heldout_votes_percent", 30),
]


def attribute(settings: Settings, path: str) -> Any:
    section, name = path.split(".")
    value = getattr(getattr(settings, section), name)
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def clear_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in env_names():
        monkeypatch.delenv(name, raising=False)


def test_every_setting_is_listed_with_its_variable() -> None:
    assert {(name, path) for name, _, path, _ in VARIABLES} == \
        {(name, ".".join(where)) for name, where in env_names().items()}


def test_every_variable_is_documented_for_users() -> None:
    root = Path(__file__).parents[1]
    docs = "\n".join(p.read_text(encoding="utf-8") for p in
                     [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    documented = set(re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", docs))
    assert sorted(set(env_names()) - documented) == []


@pytest.mark.parametrize(("name", "sample", "path", "expected"), VARIABLES,
                         ids=[v[0] for v in VARIABLES])
def test_each_variable_sets_its_setting_and_nothing_else(
        monkeypatch: pytest.MonkeyPatch, name: str, sample: str, path: str,
        expected: Any) -> None:
    clear_environment(monkeypatch)
    default = Settings(_env_file=None)
    assert attribute(default, path) != expected  # the sample is not the default
    monkeypatch.setenv(name, sample)
    settings = Settings(_env_file=None)
    assert attribute(settings, path) == expected
    section = path.split(".")[0]
    for other in Settings.model_fields:
        before = getattr(default, other)
        changed = {k for k, v in getattr(settings, other) if getattr(before, k) != v}
        assert changed == ({path.split(".")[1]} if other == section else set()), other


def test_dotenv_is_read_and_an_aliased_field_only_by_its_own_name(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clear_environment(monkeypatch)
    env_file = tmp_path / ".env"
    env_file.write_text("CHATLOOP_MAX_TOKENS=99\nTELEGRAM_BOT_TOKEN=1:dotenv\n"
                        "CHATLOOP_URL=http://not-this\nCHATLOOP_LEARN_ADAPTERS_DIR=/not-this\n")
    settings = Settings(_env_file=env_file)
    assert settings.core.max_tokens == 99
    assert settings.telegram.bot_token is not None
    assert settings.telegram.bot_token.get_secret_value() == "1:dotenv"
    assert settings.inference.url is None and settings.learn.adapters_dir == Path("var/adapters")
    monkeypatch.setenv("CHATLOOP_MAX_TOKENS", "77")  # the environment wins over .env
    assert Settings(_env_file=env_file).core.max_tokens == 77
    assert Settings(_env_file=None).telegram.bot_token is None


def test_values_in_code_win_and_the_rest_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_environment(monkeypatch)
    monkeypatch.setenv("CHATLOOP_MAX_TOKENS", "64")
    monkeypatch.setenv("CHATLOOP_HISTORY_MESSAGES", "3")
    settings = Settings(_env_file=None, core={"max_tokens": 32},  # type: ignore[arg-type]
                        telegram={"bot_token": "1:code"})  # type: ignore[arg-type]
    assert (settings.core.max_tokens, settings.core.history_messages) == (32, 3)
    assert settings.telegram.bot_token is not None
    assert settings.telegram.bot_token.get_secret_value() == "1:code"
    flat = Settings.from_env_names(_env_file=None, max_tokens=48, slack_bot_token="xoxb-2",
                                   CHATLOOP_LEARN_RANK=4)
    assert (flat.core.max_tokens, flat.learn.rank, flat.core.history_messages) == (48, 4, 3)
    assert flat.slack.bot_token is not None and flat.slack.bot_token.get_secret_value() == "xoxb-2"
    with pytest.raises(TypeError, match="no setting is named 'max_token'"):
        Settings.from_env_names(_env_file=None, max_token=48)
    with pytest.raises(ValidationError):
        Settings(_env_file=None, max_tokens=48)  # type: ignore[call-arg]  # not a section


def test_validation_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_environment(monkeypatch)
    monkeypatch.setenv("CHATLOOP_CONTEXT_TOKENS", "512")
    monkeypatch.setenv("CHATLOOP_MAX_TOKENS", "512")  # must stay below the context
    with pytest.raises(ValidationError) as bad:
        Settings(_env_file=None)
    assert describe_error(bad.value) == \
        "CHATLOOP_MAX_TOKENS: Value error, must be below CHATLOOP_CONTEXT_TOKENS (512)"
    monkeypatch.delenv("CHATLOOP_MAX_TOKENS")
    monkeypatch.setenv("CHATLOOP_TELEGRAM_POLL_TIMEOUT_S", "51")
    with pytest.raises(ValidationError) as bad:
        Settings(_env_file=None)
    assert describe_error(bad.value).startswith("CHATLOOP_TELEGRAM_POLL_TIMEOUT_S: ")
    monkeypatch.setenv("CHATLOOP_DATABASE_URL", "var/chatloop.db")
    with pytest.raises(ValidationError) as bad:
        Settings(_env_file=None)
    assert describe_error(bad.value).startswith("CHATLOOP_DATABASE_URL: Value error, must be a URL")


def test_empty_variables_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_environment(monkeypatch)
    monkeypatch.setenv("CHATLOOP_PORT", "")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", "")
    settings = Settings(_env_file=None)
    assert settings.gateway.port == 8000 and settings.slack.signing_secret is None


def test_the_learning_loop_trains_with_the_training_jobs_defaults(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clear_environment(monkeypatch)
    job = loop_config(Settings(_env_file=None)).train
    default = TrainJob(model_dir=job.model_dir, out_dir="", work_dir="")
    assert dataclasses.asdict(job) == dataclasses.asdict(default)


def test_web_votes_weigh_nothing_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_environment(monkeypatch)
    assert loop_config(Settings(_env_file=None)).dataset.web_vote_weight == 0.0
    monkeypatch.setenv("CHATLOOP_LEARN_WEB_VOTE_WEIGHT", "1")
    assert loop_config(Settings(_env_file=None)).dataset.web_vote_weight == 1.0
    monkeypatch.setenv("CHATLOOP_LEARN_WEB_VOTE_WEIGHT", "-0.5")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)


def test_neftune_is_off_by_default_and_configurable() -> None:
    assert loop_config(Settings(_env_file=None)).train.neftune_alpha is None
    on = Settings(_env_file=None, learn={"neftune_alpha": 5})  # type: ignore[arg-type]
    assert loop_config(on).train.neftune_alpha == 5.0
    with pytest.raises(ValidationError):
        Settings(_env_file=None, learn={"neftune_alpha": -1})  # type: ignore[arg-type]


def test_question_augmentation_is_configurable_and_checked() -> None:
    off = Settings(_env_file=None, learn={"augment": 0})  # type: ignore[arg-type]
    assert loop_config(off).train.augment == 0
    with pytest.raises(ValidationError):
        Settings(_env_file=None, learn={"augment": -1})  # type: ignore[arg-type]


def test_training_precision_is_configurable_and_checked() -> None:
    assert loop_config(Settings(_env_file=None)).train.precision == "auto"
    fp32 = Settings(_env_file=None, learn={"precision": "fp32"})  # type: ignore[arg-type]
    assert loop_config(fp32).train.precision == "fp32"
    with pytest.raises(ValidationError):
        Settings(_env_file=None, learn={"precision": "fp16"})  # type: ignore[arg-type]


def test_a_forced_training_precision_is_used_and_an_unknown_one_refused() -> None:
    def job(precision: str) -> TrainJob:
        return TrainJob(model_dir="", out_dir="", work_dir="", precision=precision)

    assert (trains_in_bf16(job("bf16")), trains_in_bf16(job("fp32"))) == (True, False)
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32"):
        trains_in_bf16(job("fp16"))


def test_the_training_worker_command_is_configurable_and_checked() -> None:
    default = loop_config(Settings(_env_file=None)).train_command
    assert default[1:] == ["-m", "feedback.train"]
    accelerate = str(Path(sys.executable).parent / "accelerate")  # installed with TRL
    cfg = loop_config(Settings(_env_file=None,  # type: ignore[arg-type]
                               learn={"train_command": f"{accelerate} launch --num_processes 1 "
                                                       "-m feedback.train"}))
    assert cfg.train_command == [accelerate, "launch", "--num_processes", "1", "-m",
                                 "feedback.train"]
    with pytest.raises(ValidationError, match="not an executable on PATH"):
        Settings(_env_file=None, learn={"train_command": "no-such-launcher -m feedback.train"})  # type: ignore[arg-type]


def test_the_old_reviewer_list_is_refused_saying_how_to_write_the_new_one(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clear_environment(monkeypatch)
    monkeypatch.setenv("CHATLOOP_REVIEWER_IDS", '["111", "U0ABC"]')
    with pytest.raises(ValidationError) as bad:
        Settings(_env_file=None)
    assert describe_error(bad.value) == (
        "CHATLOOP_REVIEWER_IDS: Value error, no longer read: reviewers are identities "
        "(channel:id); remove it and set "
        """CHATLOOP_REVIEWERS='["telegram:111", "slack:TEAM_ID/U0ABC"]'""")
    monkeypatch.delenv("CHATLOOP_REVIEWER_IDS")
    env_file = tmp_path / ".env"
    env_file.write_text('CHATLOOP_REVIEWER_IDS=["42"]\n')
    with pytest.raises(ValidationError) as bad:
        Settings(_env_file=env_file)
    assert describe_error(bad.value).endswith("""CHATLOOP_REVIEWERS='["telegram:42"]'""")


@pytest.mark.parametrize(("entry", "why"), [
    ("web:abc", "web identities are never reviewers"),
    ("111", "is not telegram:USER_ID or slack:TEAM_ID/USER_ID"),
    ("slack:U0ABC", "is not telegram:USER_ID or slack:TEAM_ID/USER_ID"),  # no team
    ("telegram:ann", "is not telegram:USER_ID or slack:TEAM_ID/USER_ID"),
])
def test_reviewers_are_telegram_or_slack_identities(monkeypatch: pytest.MonkeyPatch,
                                                     entry: str, why: str) -> None:
    clear_environment(monkeypatch)
    monkeypatch.setenv("CHATLOOP_REVIEWERS", f'["telegram:111", "{entry}"]')
    with pytest.raises(ValidationError) as bad:
        Settings(_env_file=None)
    assert describe_error(bad.value).startswith("CHATLOOP_REVIEWERS: ")
    assert why in describe_error(bad.value)


def test_the_dpo_step_and_the_votes_split_reach_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATLOOP_LEARN_DPO_MIN_PAIRS", "3")
    monkeypatch.setenv("CHATLOOP_LEARN_HELDOUT_VOTES_PERCENT", "30")
    cfg = loop_config(Settings(_env_file=None))
    assert cfg.train.dpo_min_pairs == 3 and cfg.dataset.heldout_votes_percent == 30


def test_memory_thresholds_are_the_embedders_calibrated_ones_unless_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from inference.memory import CALIBRATED

    clear_environment(monkeypatch)
    assert Settings(_env_file=None).memory.thresholds() == CALIBRATED["minilm"]
    monkeypatch.setenv("CHATLOOP_MEMORY_EMBEDDER", "wordllama")
    assert Settings(_env_file=None).memory.thresholds() == CALIBRATED["wordllama"]
    monkeypatch.setenv("CHATLOOP_MEMORY_ANSWER_THRESHOLD", "0.9")
    assert Settings(_env_file=None).memory.thresholds() == (0.9, CALIBRATED["wordllama"][1])
    monkeypatch.setenv("CHATLOOP_MEMORY_EMBEDDER", "hf:/models/e5")  # no calibration of its own
    with pytest.raises(ValueError, match="CHATLOOP_MEMORY_REFERENCE_THRESHOLD"):
        Settings(_env_file=None).memory.thresholds()
    monkeypatch.setenv("CHATLOOP_MEMORY_REFERENCE_THRESHOLD", "0.7")
    assert Settings(_env_file=None).memory.thresholds() == (0.9, 0.7)
