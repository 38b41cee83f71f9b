"""`chatloop health ...`: health checks for container orchestrators (exit 0 when healthy)."""

from __future__ import annotations

import typer

from chatloop.cli.common import die, load_settings

health_app = typer.Typer(no_args_is_help=True,
                         help="Health checks (compose and Kubernetes probes): 0 when healthy.")


@health_app.command("trainer")
def trainer() -> None:
    """Healthy when this host's scheduler wrote its heartbeat within its lease TTL
    (CHATLOOP_LEARN_LEASE_TTL_S): it is running and reaches the database."""
    import asyncio

    from storage import locks
    from storage.db import make_engine, session_factory

    async def beating() -> bool:
        engine = make_engine(load_settings().storage.database_url)
        try:
            async with session_factory(engine)() as s:
                return await locks.alive(s, name=locks.heartbeat_name("scheduler"))
        finally:
            await engine.dispose()

    try:
        fresh = asyncio.run(asyncio.wait_for(beating(), timeout=10))
    except Exception as exc:  # the probe's answer is its exit code
        die(f"trainer unhealthy: database unreachable or not migrated ({type(exc).__name__})",
            code=1)
    if not fresh:
        name = locks.heartbeat_name("scheduler")
        die(f"trainer unhealthy: no fresh scheduler heartbeat ({name})", code=1)
    typer.echo("trainer: healthy")


def register(app: typer.Typer) -> None:
    """Add `chatloop health` to the `chatloop` app."""
    app.add_typer(health_app, name="health")
