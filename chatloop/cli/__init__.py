"""The `chatloop` command line: errors become one clear line and a non-zero exit here.

This module has the app and the service's commands (db, model, serve, demo); the learning
loop's are in chatloop/cli/learn.py, what they share in chatloop/cli/common.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import SecretStr

from chatloop.cli.common import die, load_settings, setup_logging, start_telemetry
from chatloop.cli.health import register as register_health
from chatloop.cli.learn import register as register_learning_loop
from chatloop.cli.memory import register as register_memory
from chatloop.cli.operators import register as register_operators
from chatloop.cli.privacy import register as register_privacy
from chatloop.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="chatloop: chat + feedback loop")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
model_app = typer.Typer(no_args_is_help=True, help="The base model.")
app.add_typer(db_app, name="db")
app.add_typer(model_app, name="model")
register_learning_loop(app)  # adapters, feedback export, runs, train, review, scheduler
register_privacy(app)  # forget, audit
register_memory(app)  # memory import|list|disable|enable|export (the answer memory)
register_health(app)  # health trainer (the compose health check)
register_operators(app)  # operators add|list|disable (the console's accounts)

log = logging.getLogger("chatloop")


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Create or migrate the database schema (CHATLOOP_DATABASE_URL)."""
    from storage.db import redacted
    from storage.migrate import upgrade

    settings = load_settings()
    try:
        upgrade(settings.storage.database_url, revision)
    except Exception as exc:  # the CLI edge: one line for the operator
        url = redacted(settings.storage.database_url)
        die(f"cannot migrate {url}: {type(exc).__name__}: {exc}")
    typer.echo(f"database {redacted(settings.storage.database_url)} is at revision {revision}")


@model_app.command("prepare")
def model_prepare(
    source: Annotated[str | None, typer.Argument(
        help="'bundled' (default), a local HF model directory, or an HF model id")] = None,
    target: Annotated[Path | None, typer.Option(help="output directory (CHATLOOP_MODEL)")] = None,
) -> None:
    """Write the safetensors model directory that the embedded engine and vLLM load, and
    the answer memory's embedding model (CHATLOOP_MEMORY_EMBEDDER) where it needs one."""
    from inference.prepare import PrepareError, prepare_model

    setup_logging()
    settings = load_settings()
    inference = settings.inference
    started = time.perf_counter()
    try:
        out = prepare_model(source or inference.model_source, target or Path(inference.model),
                            cache_dir=inference.model_cache)
        embedder = _prepare_embedder(settings)
    except PrepareError as exc:
        die(str(exc))
    typer.echo(f"model ready at {out} ({time.perf_counter() - started:.1f}s)")
    if embedder is not None:
        typer.echo(f"answer-memory embedding model ready at {embedder}")


def _prepare_embedder(settings: Settings) -> Path | None:
    from inference.memory import embedder_dir
    from inference.prepare import prepare_embedder

    target = embedder_dir(settings.memory.embedder) if settings.memory.enabled else None
    if target is None:
        return None
    return prepare_embedder(target, cache_dir=settings.inference.model_cache)


@app.command()
def serve() -> None:
    """Run the gateway (CHATLOOP_HOST:CHATLOOP_PORT): channels, /healthz, /readyz."""
    settings = load_settings()
    if settings.webchat.enabled and settings.webchat.token is None:
        die("CHATLOOP_WEBCHAT_ENABLED=true requires CHATLOOP_WEBCHAT_TOKEN under `serve`")
    if settings.webchat.enabled and settings.webchat.secret is None:  # every replica's key
        die("CHATLOOP_WEBCHAT_ENABLED=true requires CHATLOOP_WEBCHAT_SECRET (16+ random "
            "characters, the same on every replica) under `serve`")
    _run(settings, webchat=settings.webchat.enabled)


@app.command()
def demo() -> None:
    """Everything in one process: SQLite, the bundled model, the embedded engine, the web chat."""
    from inference.prepare import prepare_model
    from storage.migrate import upgrade

    setup_logging()
    settings = load_settings()
    if not settings.storage.database_url.startswith("sqlite"):
        typer.echo("note: demo uses CHATLOOP_DATABASE_URL as set", err=True)
    upgrade(settings.storage.database_url)
    inference = settings.inference
    if not inference.url:
        prepare_model(inference.model_source, Path(inference.model),
                      cache_dir=inference.model_cache)
    _prepare_embedder(settings)
    settings.webchat.token = None
    if settings.webchat.secret is None:
        settings.webchat.secret = SecretStr(_kept_secret(DEMO_SECRET))
    demo_sized = {"min_feedback": 5, "min_interval_s": 60, "check_interval_s": 30,
                  "canary_min_votes": 5, "web_vote_weight": 1.0,
                  # a passing adapter serves every conversation at once: the person at the
                  # browser sees what their corrections taught
                  "canary_percent": 100.0,
                  # a handful of corrections moves the golden-set loss more than fifty do
                  # (6 in the demo benchmark: +7.7 %); production keeps 5 %
                  "golden_margin": 0.15}
    for name, value in demo_sized.items():  # unless set in the environment
        if name not in settings.learn.model_fields_set:
            setattr(settings.learn, name, value)
    gateway = settings.gateway
    typer.echo(f"chatloop demo: open http://{gateway.host}:{gateway.port}/chat")
    _run(settings, webchat=True, learning=True, web_operator=True)


DEMO_SECRET = Path("var/webchat-secret")


def _kept_secret(path: Path) -> str:
    """The secret stored at `path`, made (random, readable by this user only) if missing:
    the demo's browsers keep their identities across restarts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def _run(settings: Settings, *, webchat: bool, learning: bool = False,
         web_operator: bool = False) -> None:
    import uvicorn

    from chatloop.app import ConfigError, build_app, build_services
    from storage.db import DatabaseNotReady

    setup_logging()
    start_telemetry(settings, "chatloop-gateway")

    async def main() -> None:
        try:
            services = await build_services(settings)
        except (DatabaseNotReady, ConfigError) as exc:
            die(str(exc))
        app = build_app(services, webchat=webchat, web_operator=web_operator)
        gateway = settings.gateway
        server = uvicorn.Server(uvicorn.Config(app, host=gateway.host, port=gateway.port,
                                               log_level="info", log_config=None
                                               if gateway.log_format == "json"  # to ours
                                               else uvicorn.config.LOGGING_CONFIG))
        stop = asyncio.Event()
        loop_task = None
        if learning:  # the learning loop runs beside the gateway, in-process
            from chatloop.app import loop_config, schedule_config
            from feedback.scheduler import LearningScheduler

            sched = LearningScheduler(engine=services.engine, sessions=services.sessions,
                                      backend=services.backend, adapters=services.adapters,
                                      loop=loop_config(settings),
                                      schedule=schedule_config(settings),
                                      database_url=settings.storage.database_url)
            loop_task = asyncio.create_task(sched.run(stop))
        try:
            await server.serve()
        except SystemExit:  # uvicorn's way out of a failed start-up
            pass
        finally:
            stop.set()
            if loop_task is not None:
                await loop_task
        if not server.started:
            reason = getattr(app.state, "startup_error", None)
            die(reason or f"the gateway did not start on {gateway.host}:{gateway.port}")

    asyncio.run(main())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
