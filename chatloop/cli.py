"""The `chatloop` command line: errors become one clear line and a non-zero exit here."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from chatloop.settings import Settings
from feedback.cli import register as register_learning_loop

app = typer.Typer(no_args_is_help=True, add_completion=False, help="chatloop: chat + feedback loop")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
model_app = typer.Typer(no_args_is_help=True, help="The base model.")
app.add_typer(db_app, name="db")
app.add_typer(model_app, name="model")
register_learning_loop(app)  # adapters, feedback export, runs, train, review, scheduler

log = logging.getLogger("chatloop")


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        name = "CHATLOOP_" + str(err["loc"][0]).upper() if err["loc"] else "settings"
        _die(f"bad configuration: {name}: {err['msg']}")


def _die(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"chatloop: {message}", err=True)
    raise typer.Exit(code)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Create or migrate the database schema (CHATLOOP_DATABASE_URL)."""
    from storage.db import redacted
    from storage.migrate import upgrade

    settings = _settings()
    try:
        upgrade(settings.database_url, revision)
    except Exception as exc:  # the CLI edge: one line for the operator
        _die(f"cannot migrate {redacted(settings.database_url)}: {type(exc).__name__}: {exc}")
    typer.echo(f"database {redacted(settings.database_url)} is at revision {revision}")


@model_app.command("prepare")
def model_prepare(
    source: Annotated[str | None, typer.Argument(
        help="'bundled' (default), a local HF model directory, or an HF model id")] = None,
    target: Annotated[Path | None, typer.Option(help="output directory (CHATLOOP_MODEL)")] = None,
) -> None:
    """Write the safetensors model directory that the embedded engine and vLLM load."""
    from inference.prepare import PrepareError, prepare_model

    _logging()
    settings = _settings()
    started = time.perf_counter()
    try:
        out = prepare_model(source or settings.model_source, target or Path(settings.model),
                            cache_dir=settings.model_cache)
    except PrepareError as exc:
        _die(str(exc))
    typer.echo(f"model ready at {out} ({time.perf_counter() - started:.1f}s)")


@app.command()
def serve() -> None:
    """Run the gateway (CHATLOOP_HOST:CHATLOOP_PORT): channels, /healthz, /readyz."""
    settings = _settings()
    if settings.webchat_enabled and settings.webchat_token is None:
        _die("CHATLOOP_WEBCHAT_ENABLED=true requires CHATLOOP_WEBCHAT_TOKEN under `serve`")
    _run(settings, webchat=settings.webchat_enabled)


@app.command()
def demo() -> None:
    """Everything in one process: SQLite, the bundled model, the embedded engine, the web chat."""
    from inference.prepare import prepare_model
    from storage.migrate import upgrade

    _logging()
    settings = _settings()
    if not settings.database_url.startswith("sqlite"):
        typer.echo("note: demo uses CHATLOOP_DATABASE_URL as set", err=True)
    upgrade(settings.database_url)
    if not settings.inference_url:
        prepare_model(settings.model_source, Path(settings.model), cache_dir=settings.model_cache)
    settings.webchat_token = None
    demo_sized = {"learn_min_feedback": 5, "learn_min_interval_s": 60,
                  "learn_check_interval_s": 30, "learn_canary_min_votes": 5}
    for name, value in demo_sized.items():  # unless set in the environment
        if name not in settings.model_fields_set:
            setattr(settings, name, value)
    typer.echo(f"chatloop demo: open http://{settings.host}:{settings.port}/chat")
    _run(settings, webchat=True, learning=True)


def _run(settings: Settings, *, webchat: bool, learning: bool = False) -> None:
    import uvicorn

    from chatloop.app import ConfigError, build_app, build_services
    from storage.db import DatabaseNotReady

    _logging()

    async def main() -> None:
        try:
            services = await build_services(settings)
        except (DatabaseNotReady, ConfigError) as exc:
            _die(str(exc))
        app = build_app(services, webchat=webchat)
        server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                               log_level="info"))
        stop = asyncio.Event()
        loop_task = None
        if learning:  # the learning loop runs beside the gateway, in-process
            from chatloop.app import loop_config, schedule_config
            from feedback.scheduler import LearningScheduler

            sched = LearningScheduler(engine=services.engine, sessions=services.sessions,
                                      backend=services.backend, loop=loop_config(settings),
                                      schedule=schedule_config(settings),
                                      database_url=settings.database_url)
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
            _die(reason or f"the gateway did not start on {settings.host}:{settings.port}")

    asyncio.run(main())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
