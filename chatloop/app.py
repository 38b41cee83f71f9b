"""The composition root: settings -> storage, inference, core, channels, gateway app."""

from __future__ import annotations

import logging
import secrets
import shlex
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bots.core import ConversationCore, CoreLimits, Router, StaticRouter
from bots.core.memory import AnswerMemory
from bots.gateway import Channel, create_app
from bots.webchat import WebChat
from bots.webid import WebIdentities
from chatloop.settings import InferenceSettings, Settings
from inference.base import InferenceBackend
from inference.errors import InferenceError
from inference.prompt import PromptFitter
from inference.registry import AdapterRef, AdapterRegistry, Retired, ServingState, StateSource
from storage import adapters as adapter_versions
from storage.db import make_engine, session_factory
from storage.migrate import check_ready
from storage.models import AdapterStatus

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
    adapters: AdapterRegistry  # what the backend serves, and the routes to it
    channels: dict[str, Channel] = field(default_factory=dict)  # by name, once build_app ran

    async def aclose(self) -> None:
        await self.core.aclose()  # gives up the leases of turns cut short
        await self.adapters.aclose()  # its background refresh uses both below
        await self.backend.aclose()
        await self.engine.dispose()


def make_backend(settings: Settings) -> InferenceBackend:
    s = settings.inference
    if s.urls:
        from inference.openai_backend import OpenAIBackend
        from inference.replicas import ReplicaBackend

        endpoints = [OpenAIBackend(
            base_url=url,
            model_name=s.served_model_name,
            api_key=s.api_key.get_secret_value(),
            connect_timeout=s.connect_timeout_s,
            read_timeout=s.read_timeout_s,
            max_retries=s.max_retries,
            max_lora_rank=s.max_lora_rank,
        ) for url in s.urls]
        # several vLLM replicas: every adapter on each, a conversation on one
        return endpoints[0] if len(endpoints) == 1 else ReplicaBackend(endpoints)
    from inference.embedded import EmbeddedBackend

    _require_model(s)
    return EmbeddedBackend(s.model, model_name=Path(s.model).name, max_lora_rank=s.max_lora_rank,
                           precision=s.embedded_precision, max_batch=s.embedded_max_batch,
                           max_kv_tokens=s.embedded_max_kv_tokens,
                           decode_threads=s.embedded_decode_threads or None,
                           packed_weights=s.embedded_packed_weights)


def _require_model(inference: InferenceSettings) -> None:
    if not (Path(inference.model) / "config.json").exists():
        raise ConfigError(
            f"no model at {inference.model}: run `chatloop model prepare` "
            "(or set CHATLOOP_MODEL to a local HF model directory)"
        )


def load_tokenizer(settings: Settings, backend: InferenceBackend) -> Any:
    tok = getattr(backend, "tokenizer", None)
    if tok is not None:
        return tok
    from transformers import AutoTokenizer

    _require_model(settings.inference)  # the tokenizer of the served model, to fit prompts
    return AutoTokenizer.from_pretrained(settings.inference.model)


async def build_services(settings: Settings, *,
                         backend: InferenceBackend | None = None) -> Services:
    """Connect storage (must be migrated) and inference; raise with one clear line if not."""
    engine = make_engine(settings.storage.database_url)
    try:
        await check_ready(engine)
        backend = backend or make_backend(settings)
    except BaseException:
        await engine.dispose()
        raise
    sessions = session_factory(engine)
    limits = settings.core
    fitter = PromptFitter(load_tokenizer(settings, backend), context_tokens=limits.context_tokens,
                          max_tokens=limits.max_tokens)
    adapters = adapter_registry(settings, sessions, backend)
    backend = adapters.backend  # counts streams: retired adapters unload only after they end
    pinned = settings.inference.adapter
    router: Router = StaticRouter(pinned)
    if pinned is None:  # the learning loop's registry decides: active + canary slice
        router = adapters  # its refreshes also re-load adapters after restarts
        try:
            await adapters.sync()
        except InferenceError as exc:  # /readyz says so; the registry syncs again on refresh
            log.warning("inference not reachable at start-up (%s): adapters load later", exc)
    core = ConversationCore(
        sessions=sessions,
        backend=backend,
        fitter=fitter,
        system_prompt=limits.system_prompt,
        limits=CoreLimits(
            max_input_chars=limits.max_input_chars,
            max_tokens=limits.max_tokens,
            history_messages=limits.history_messages,
            rate_limit_per_minute=limits.rate_limit_per_minute,
            max_concurrent_generations=limits.max_concurrent_generations,
            event_lease_s=limits.event_lease_s,
        ),
        router=router,
        reviewers=frozenset(limits.reviewers),
        owner=limits.replica_id,
        memory=await answer_memory(settings, sessions),
        handoff=handoff_policy(settings),
    )
    return Services(settings, engine, sessions, backend, core, adapters)


def handoff_policy(settings: Settings) -> Any:
    """Where a person can take over (the channels with a place for agents) and the timers."""
    from bots.core.handoff import HandoffPolicy, SupportHours

    h = settings.handoff
    channels = {name for name, on in (
        ("telegram", settings.telegram.agents_chat is not None),
        ("slack", bool(settings.slack.handoff_channel)),
        ("web", settings.console.enabled)) if on}
    return HandoffPolicy(
        channels=frozenset(channels), phrases=tuple(h.phrases),
        after_downvotes=h.after_downvotes, idle_s=h.idle_s, wait_s=h.wait_s,
        hours=SupportHours.parse(h.hours, h.timezone) if h.hours else None,
        ticket_url=h.ticket_url, expected_wait=h.expected_wait)


async def answer_memory(settings: Settings, sessions: async_sessionmaker[AsyncSession]
                        ) -> AnswerMemory | None:
    """The answer memory from the settings, loaded from the database (None if disabled)."""
    m = settings.memory
    if not m.enabled:
        return None
    from inference.memory import HybridIndex, load_embedder

    answer_at, refer_at = m.thresholds()
    memory = AnswerMemory(sessions, HybridIndex(load_embedder(m.embedder)),
                          answer_at=answer_at, refer_at=refer_at,
                          max_references=m.max_references, refresh_s=m.refresh_s,
                          voice=settings.learn.memory_voice())
    await memory.refresh()
    return memory


def adapter_source(sessions: async_sessionmaker[AsyncSession]) -> StateSource:
    """What to serve, read from the adapter versions in storage (the registry's source)."""
    async def read() -> ServingState:
        async with sessions() as s:
            versions = await adapter_versions.lifecycle(s)
        serving = {v.status: AdapterRef(v.name, v.path, v.rank) for v in versions
                   if v.status in (AdapterStatus.ACTIVE, AdapterStatus.CANARY)}
        return ServingState(
            active=serving.get(AdapterStatus.ACTIVE), canary=serving.get(AdapterStatus.CANARY),
            retired=tuple(Retired(v.name, v.updated_at) for v in versions
                          if v.status in (AdapterStatus.RETIRED, AdapterStatus.REJECTED)))

    return read


def adapter_registry(settings: Settings, sessions: async_sessionmaker[AsyncSession],
                     backend: InferenceBackend) -> AdapterRegistry:
    """The adapters `backend` serves, as the learning loop decided (the gateway routes with
    it; the scheduler keeps its own backend in sync with it)."""
    return AdapterRegistry(backend, source=adapter_source(sessions),
                           canary_percent=settings.learn.canary_percent,
                           drain_grace=timedelta(seconds=settings.learn.drain_s),
                           max_rank=settings.inference.max_lora_rank,
                           adapters_dir=settings.learn.adapters_dir)


def build_channels(services: Services, *, webchat: bool,
                   web_operator: bool = False) -> list[Channel]:
    """The configured channels: the web chat if asked, Telegram and Slack if they have a token;
    each built from its own settings. `web_operator`: the person at the web chat is this
    deployment's operator (the demo's local user), whose corrections are trusted."""
    settings, core = services.settings, services.core
    channels: list[Channel] = []
    if webchat:
        token = settings.webchat.token
        # under `serve` web identities are never trusted (see WebChat); the demo's are
        channels.append(WebChat(core, token=token.get_secret_value() if token else None,
                                identities=web_identities(settings), operator=web_operator))
    if settings.telegram.bot_token is not None:
        from bots.telegram import build_channel as build_telegram

        channels.append(build_telegram(settings.telegram, core=core))
    if settings.slack.bot_token is not None:
        from bots.slack import build_channel as build_slack

        channels.append(build_slack(settings.slack, core=core,
                                    max_answers=2 * settings.core.max_concurrent_generations))
    return channels


def web_identities(settings: Settings) -> WebIdentities:
    """The web chat's cookie signer, with CHATLOOP_WEBCHAT_SECRET (the CLI requires it under
    `serve` and keeps one under var/ for the demo); unset, a key of this process only."""
    secret = settings.webchat.secret
    if secret is None:
        log.warning("CHATLOOP_WEBCHAT_SECRET is not set: web chat identities last until this "
                    "process stops")
        return WebIdentities(secrets.token_urlsafe(32))
    return WebIdentities(secret.get_secret_value())


def build_app(services: Services, *, webchat: bool, web_operator: bool = False) -> FastAPI:
    async def ready() -> dict[str, str]:
        checks = {"database": "ok", "inference": "ok"}
        try:
            async with services.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:  # reported, not raised: this is the readiness probe
            log.warning("readiness: database unreachable: %s", type(exc).__name__)
            checks["database"] = "unreachable"  # terse: anyone may call /readyz
        # the registry's check also loads the adapters again on a restarted server
        pinned = services.settings.inference.adapter is not None
        try:
            await (services.backend if pinned else services.adapters).health()
        except InferenceError as exc:
            log.warning("readiness: inference %s: %s", exc.kind, exc)
            checks["inference"] = exc.kind
        return checks

    channels = build_channels(services, webchat=webchat, web_operator=web_operator)
    services.channels = {ch.name: ch for ch in channels}
    if services.settings.console.enabled:  # the operator console under /console
        from chatloop.console import build_console

        settings = services.settings
        channels.append(build_console(settings, services.sessions,
                                      canary_policy=schedule_config(settings).canary,
                                      rules=loop_config(settings).dataset))
    return create_app(channels=channels, ready=ready, on_shutdown=services.aclose)


def loop_config(settings: Settings) -> Any:
    """The learning loop's configuration (feedback.loop.LoopConfig) from the settings."""
    from feedback.dataset import DatasetPolicy
    from feedback.evaluate import GatePolicy
    from feedback.loop import LoopConfig
    from feedback.train import TrainJob

    learn, model = settings.learn, settings.inference.model
    command = {"train_command": shlex.split(learn.train_command)} if learn.train_command else {}
    return LoopConfig(
        model_dir=model, adapters_dir=learn.adapters_dir.resolve(),
        runs_dir=learn.runs_dir.resolve(), adapter_prefix=learn.adapter_prefix,
        dataset=DatasetPolicy(heldout_percent=learn.heldout_percent,
                              heldout_votes_percent=learn.heldout_votes_percent,
                              min_voters=learn.min_voters, per_user_cap=learn.per_user_cap,
                              web_vote_weight=learn.web_vote_weight,
                              include_liked=learn.include_liked,
                              replay_fraction=learn.replay_fraction,
                              context_tokens=settings.core.context_tokens // 2,
                              system_prompt=settings.core.system_prompt),
        gate=GatePolicy(golden_margin=learn.golden_margin, rephrasings=learn.gate_rephrasings),
        redactor=settings.learn.redactor(),
        train=TrainJob(model_dir=model, out_dir="", work_dir="", rank=learn.rank,
                       alpha=2 * learn.rank, epochs=learn.epochs,
                       learning_rate=learn.learning_rate, batch_size=learn.batch_size,
                       max_length=learn.max_length, kto_min_examples=learn.kto_min_examples,
                       neftune_alpha=learn.neftune_alpha or None, augment=learn.augment,
                       reference_copies=learn.reference_copies,
                       precision=learn.precision, dpo_min_pairs=learn.dpo_min_pairs,
                       memory_embedder=settings.memory.embedder if settings.memory.enabled
                       else "", memory_answer_at=settings.memory.answer_threshold,
                       memory_refer_at=settings.memory.reference_threshold),
        min_new_feedback=learn.min_feedback,
        min_interval=timedelta(seconds=learn.min_interval_s),
        incremental=learn.incremental,
        settle=learn.settle_heldout,
        **command,
    )


def schedule_config(settings: Settings) -> Any:
    """The scheduler's configuration (feedback.scheduler.ScheduleConfig) from the settings."""
    from feedback.canary import CanaryPolicy
    from feedback.scheduler import ScheduleConfig

    learn = settings.learn
    return ScheduleConfig(
        check_every=timedelta(seconds=learn.check_interval_s),
        canary_every=timedelta(seconds=learn.canary_interval_s),
        cron=learn.cron or None, lease_ttl=timedelta(seconds=learn.lease_ttl_s),
        canary=CanaryPolicy(min_votes=learn.canary_min_votes,
                            max_votes=learn.canary_max_votes, margin=learn.canary_margin),
        retention_days=settings.storage.retention_days,
    )
