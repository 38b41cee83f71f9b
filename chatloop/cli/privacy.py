"""The privacy commands: `chatloop forget` (a person or a conversation) and `chatloop audit`.

Registered on the `chatloop` app by chatloop/cli/__init__.py; errors become one line (die).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Any

import typer

from chatloop.cli.common import (
    cycle,
    database,
    die,
    load_settings,
    report_cycle,
    run,
    setup_logging,
)
from chatloop.settings import Settings


def forget(
    identity: Annotated[str | None, typer.Argument(
        help="the person as stored: telegram:123, slack:T0/U0ABC, web:...")] = None,
    conversation: Annotated[int | None, typer.Option(
        "--conversation", help="forget this conversation (its id) instead")] = None,
    retrain: Annotated[bool, typer.Option(
        "--retrain", help="then train from the base model now (as `train --now`)")] = False,
) -> None:
    """Delete a person's (or a conversation's) data, dataset rows and exports included.

    Messages, event payloads, votes, corrections, the rows of dataset files under the runs
    directory and of exports; adapters trained on it become tainted."""
    from feedback import erasure
    from storage.audit import cli_actor

    if (identity is None) == (conversation is None):
        die("give either IDENTITY or --conversation ID")
    settings = load_settings()
    runs_dir = settings.learn.runs_dir.resolve()
    adapters_dir = settings.learn.adapters_dir.resolve()

    async def main() -> erasure.Report:
        async with database() as (_, sessions):
            if identity is not None:
                return await erasure.forget_person(sessions, identity=identity,
                                                   runs_dir=runs_dir, adapters_dir=adapters_dir,
                                                   actor=cli_actor())
            assert conversation is not None
            return await erasure.forget_conversation(sessions, conversation_id=conversation,
                                                     runs_dir=runs_dir, adapters_dir=adapters_dir,
                                                   actor=cli_actor())

    report = run(main)
    who = identity if identity is not None else f"conversation {conversation}"
    if identity is None and not report.erased.counts:
        die(f"no conversation with id {conversation}")
    typer.echo(_summary(who, report))
    if retrain:
        _retrain(settings)


def _summary(who: str, report: Any) -> str:
    c = report.erased.counts
    lines = [f"forgot {who}: deleted {c.get('messages', 0)} messages, "
             f"{c.get('feedback', 0)} votes and corrections, {c.get('event_payloads', 0)} "
             f"event payloads, {c.get('conversations', 0)} conversations; removed "
             f"{report.rows} dataset rows from {len(report.files)} files"]
    if report.erased.identity_hash and not report.erased.anything:
        lines.append("  nothing was stored for them; their hash is kept, so what they write "
                     "later stays out of datasets")
    if report.tainted_runs:
        lines.append(f"  tainted: runs {', '.join(f'#{r}' for r in report.tainted_runs)}; "
                     f"adapters {', '.join(report.tainted_adapters) or '-'} "
                     "(the next run trains from the base model without this data; "
                     "--retrain starts it now)")
    return "\n".join(lines)


def _retrain(settings: Settings) -> None:
    """`train --now` from the base model; a tainted canary is rolled back first (it would
    hold the run back, and is never promoted)."""
    from chatloop.app import loop_config
    from storage import adapters, audit

    setup_logging()
    cfg = replace(loop_config(settings), incremental=False)

    async def main() -> Any:
        async with database() as (_, sessions):
            async with sessions() as s:
                canary = (await adapters.serving(s)).canary
                if canary is not None and canary.tainted_at is not None:
                    removed, active = await adapters.rollback(s)
                    await audit.log(s, actor=audit.cli_actor(), action=audit.Action.ROLLBACK,
                                    target=f"adapter:{removed}",
                                    detail={"active": active, "tainted": True})
            return await cycle(settings, sessions, cfg, trigger="forget")

    report_cycle(run(main))


def audit_log(
    limit: Annotated[int, typer.Option(help="how many entries")] = 50,
    action: Annotated[str | None, typer.Option(
        help="only this action: approve, reject, promote, rollback, forget, retention")] = None,
) -> None:
    """Who approved, rejected, promoted, rolled back, forgot or deleted what, newest first."""
    from storage import audit

    async def main() -> list[Any]:
        async with database() as (_, sessions), sessions() as s:
            return await audit.recent(s, limit=limit, action=action)

    for e in run(main):
        detail = f"  {json.dumps(e.detail, sort_keys=True)}" if e.detail else ""
        typer.echo(f"{e.at:%Y-%m-%d %H:%M:%S}  {e.actor:<24} {e.action:<10} {e.target}{detail}")


def register(app: typer.Typer) -> None:
    """Add the privacy commands to the `chatloop` app."""
    app.command()(forget)
    app.command(name="audit")(audit_log)
