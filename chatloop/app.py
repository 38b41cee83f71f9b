"""The composition root: settings -> storage, inference, core, channels, gateway app."""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bots.core import ConversationCore, CoreLimits, Router, StaticRouter
from bots.gateway import Channel, create_app
from bots.webchat import WebChat
from chatloop.settings import Settings
from feedback.serving import DrainingBackend, RegistryRouter, sync_adapters
from inference.base import InferenceBackend
from inference.errors import InferenceError
from inference.prompt import PromptFitter
from storage.db import check_ready, make_engine, session_factory

log = logging.getLogger(__name__)


class ConfigError(RuntimeError):
    """Bad or incomplete configuration; the message says what to set or run."""


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    backend: InferenceBackend
    core: ConversationCore
    extra: dict[str, Any] = field(default_factory=dict)

    async def aclose(self) -> None:
        await self.core.aclose()  # gives up the leases of turns cut short
        if isinstance(self.core.router, RegistryRouter):
            await self.core.router.aclose()  # its background refresh uses both below
        await self.backend.aclose()
        await self.engine.dispose()


def make_backend(settings: Settings) -> InferenceBackend:
    if settings.inference_url:
        from inference.openai_backend import OpenAIBackend

        return OpenAIBackend(
            base_url=settings.inference_url,
            model_name=settings.served_model_name,
            api_key=settings.inference_api_key.get_secret_value(),
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            max_retries=settings.max_retries,
            max_lora_rank=settings.max_lora_rank,
        )
    from inference.embedded import EmbeddedBackend

    _require_model(settings)
    return EmbeddedBackend(settings.model, model_name=Path(settings.model).name,
                           max_lora_rank=settings.max_lora_rank)


def _require_model(settings: Settings) -> None:
    if not (Path(settings.model) / "config.json").exists():
        raise ConfigError(
            f"no model at {settings.model}: run `chatloop model prepare` "
            "(or set CHATLOOP_MODEL to a local HF model directory)"
        )


def load_tokenizer(settings: Settings, backend: InferenceBackend) -> Any:
    tok = getattr(backend, "tokenizer", None)
    if tok is not None:
        return tok
    from transformers import AutoTokenizer

    _require_model(settings)  # the tokenizer of the served model, used to fit prompts
    return AutoTokenizer.from_pretrained(settings.model)


async def build_services(settings: Settings, *,
                         backend: InferenceBackend | None = None) -> Services:
    """Connect storage (must be migrated) and inference; raise with one clear line if not."""
    engine = make_engine(settings.database_url)
    try:
        await check_ready(engine)
        backend = backend or make_backend(settings)
    except BaseException:
        await engine.dispose()
        raise
    sessions = session_factory(engine)
    fitter = PromptFitter(load_tokenizer(settings, backend), context_tokens=settings.context_tokens,
                          max_tokens=settings.max_tokens)
    backend = DrainingBackend(backend)  # retired adapters unload only after their requests end
    router: Router = StaticRouter(settings.adapter)
    if settings.adapter is None:  # the learning loop's registry decides: active + canary slice
        router = RegistryRouter(sessions, canary_percent=settings.learn_canary_percent,
                                backend=backend,  # also re-loads adapters after restarts
                                drain_grace=timedelta(seconds=settings.learn_drain_s))
        try:
            await sync_adapters(sessions, backend)
        except InferenceError as exc:  # /readyz says so; the router syncs again on refresh
            log.warning("inference not reachable at start-up (%s): adapters load later", exc)
    core = ConversationCore(
        sessions=sessions,
        backend=backend,
        fitter=fitter,
        system_prompt=settings.system_prompt,
        limits=CoreLimits(
            max_input_chars=settings.max_input_chars,
            max_tokens=settings.max_tokens,
            history_messages=settings.history_messages,
            rate_limit_per_minute=settings.rate_limit_per_minute,
            max_concurrent_generations=settings.max_concurrent_generations,
            event_lease_s=settings.event_lease_s,
        ),
        router=router,
        reviewer_ids=frozenset(settings.reviewer_ids),
        owner=settings.replica_id,
    )
    return Services(settings, engine, sessions, backend, core)


def build_channels(services: Services, *, webchat: bool) -> list[Channel]:
    settings = services.settings
    channels: list[Channel] = []
    if webchat:
        token = settings.webchat_token.get_secret_value() if settings.webchat_token else None
        channels.append(WebChat(services.core, token=token))
    if settings.telegram_bot_token is not None:
        from bots.telegram import build_channel as build_telegram

        channels.append(build_telegram(services))
    if settings.slack_bot_token is not None:
        from bots.slack import build_channel as build_slack

        channels.append(build_slack(services))
    return channels


def build_app(services: Services, *, webchat: bool) -> FastAPI:
    async def ready() -> dict[str, str]:
        checks = {"database": "ok", "inference": "ok"}
        try:
            async with services.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:  # reported, not raised: this is the readiness probe
            checks["database"] = f"unreachable: {type(exc).__name__}"
        try:
            await services.backend.health()
        except InferenceError as exc:
            checks["inference"] = f"{exc.kind}: {exc}"
        return checks

    return create_app(channels=build_channels(services, webchat=webchat), ready=ready,
                      on_shutdown=services.aclose)


def loop_config(settings: Settings) -> Any:
    """The learning loop's configuration (feedback.loop.LoopConfig) from the settings."""
    from feedback.dataset import DatasetPolicy
    from feedback.evaluate import GatePolicy
    from feedback.loop import LoopConfig
    from feedback.redaction import Redactor
    from feedback.train import TrainJob

    s = settings
    command = {"train_command": shlex.split(s.learn_train_command)} if s.learn_train_command else {}
    return LoopConfig(
        model_dir=s.model, adapters_dir=s.adapters_dir.resolve(),
        runs_dir=s.learn_runs_dir.resolve(), adapter_prefix=s.learn_adapter_prefix,
        dataset=DatasetPolicy(heldout_percent=s.learn_heldout_percent,
                              min_voters=s.learn_min_voters, per_user_cap=s.learn_per_user_cap,
                              include_liked=s.learn_include_liked,
                              replay_fraction=s.learn_replay_fraction,
                              context_tokens=s.context_tokens // 2,
                              system_prompt=s.system_prompt),
        gate=GatePolicy(golden_margin=s.learn_golden_margin),
        redactor=Redactor(patterns=s.learn_redact_patterns,
                          allow=frozenset(s.learn_redact_allow)),
        train=TrainJob(model_dir=s.model, out_dir="", work_dir="", rank=s.learn_rank,
                       alpha=2 * s.learn_rank, epochs=s.learn_epochs,
                       learning_rate=s.learn_learning_rate, batch_size=s.learn_batch_size,
                       max_length=s.learn_max_length,
                       kto_min_examples=s.learn_kto_min_examples,
                       neftune_alpha=s.learn_neftune_alpha or None, augment=s.learn_augment,
                       precision=s.learn_precision),
        min_new_feedback=s.learn_min_feedback,
        min_interval=timedelta(seconds=s.learn_min_interval_s),
        incremental=s.learn_incremental,
        **command,
    )


def schedule_config(settings: Settings) -> Any:
    """The scheduler's configuration (feedback.scheduler.ScheduleConfig) from the settings."""
    from feedback.canary import CanaryPolicy
    from feedback.scheduler import ScheduleConfig

    s = settings
    return ScheduleConfig(
        check_every=timedelta(seconds=s.learn_check_interval_s),
        canary_every=timedelta(seconds=s.learn_canary_interval_s),
        cron=s.learn_cron or None, lease_ttl=timedelta(seconds=s.learn_lease_ttl_s),
        canary=CanaryPolicy(min_votes=s.learn_canary_min_votes,
                            max_votes=s.learn_canary_max_votes, margin=s.learn_canary_margin),
    )
