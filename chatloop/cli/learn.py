"""The learning loop's commands: adapters, runs, train --now, review, feedback export, scheduler.

Registered on the `chatloop` app by chatloop/cli/__init__.py; errors become one line (die).
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
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
    start_telemetry,
)

adapters_app = typer.Typer(no_args_is_help=True, help="LoRA adapters: list, promote, roll back.")
feedback_app = typer.Typer(no_args_is_help=True, help="Feedback data.")


@adapters_app.command("list")
def adapters_list() -> None:
    """Every adapter version with its status, lineage and gate metrics."""
    from storage import adapters

    async def main() -> list[Any]:
        async with database() as (_, sessions), sessions() as s:
            return await adapters.all_versions(s)

    rows = run(main)
    typer.echo(f"{'NAME':<14}{'STATUS':<11}{'RANK':>5}  {'PARENT':<14}{'RUN':>5}  "
               f"{'HELDOUT LOSS':<18}{'CREATED':<18}TAINTED")
    for v in rows:
        m = v.metrics or {}
        loss = (f"{m['parent']['heldout_loss']:.3f}->{m['candidate']['heldout_loss']:.3f}"
                if m.get("candidate", {}).get("heldout_loss") is not None else "-")
        typer.echo(f"{v.name:<14}{v.status:<11}{v.rank:>5}  {v.parent_name or '-':<14}"
                   f"{v.run_id or '-':>5}  {loss:<18}{v.created_at:%Y-%m-%d %H:%M}  "
                   + (f"tainted {v.tainted_at:%Y-%m-%d %H:%M}" if v.tainted_at else "-"))


@adapters_app.command("promote")
def adapters_promote(name: str) -> None:
    """Make NAME the active adapter (the current one is retired)."""
    from storage import adapters, audit

    async def main() -> None:
        async with database() as (_, sessions), sessions() as s:
            await adapters.promote(s, name=name)
            await audit.log(s, actor=audit.cli_actor(), action=audit.Action.PROMOTE,
                            target=f"adapter:{name}")

    run(main)
    typer.echo(f"{name} is now active (gateways pick it up within seconds)")


@adapters_app.command("rollback")
def adapters_rollback() -> None:
    """Reject the canary, or retire the active adapter and restore its parent."""
    from storage import adapters, audit

    async def main() -> tuple[str, str | None]:
        async with database() as (_, sessions), sessions() as s:
            removed, active = await adapters.rollback(s)
            await audit.log(s, actor=audit.cli_actor(), action=audit.Action.ROLLBACK,
                            target=f"adapter:{removed}", detail={"active": active})
            return removed, active

    removed, active = run(main)
    typer.echo(f"rolled back {removed}; active: {active or 'base model'}")


def runs(limit: Annotated[int, typer.Option(help="how many runs")] = 20) -> None:
    """Recent training runs: status, trigger, adapter, metrics, corrections, log path."""
    from storage.runs import recent_runs

    async def main() -> list[Any]:
        async with database() as (_, sessions), sessions() as s:
            return await recent_runs(s, limit=limit)

    for r in run(main):
        m = r.metrics or {}
        cand, parent = m.get("candidate", {}), m.get("parent", {})
        metrics = (f"heldout {parent.get('heldout_loss') or 0:.3f}->"
                   f"{cand.get('heldout_loss') or 0:.3f} accuracy "
                   f"{parent.get('heldout_accuracy') or 0:.2f}->"
                   f"{cand.get('heldout_accuracy') or 0:.2f} golden "
                   f"{parent.get('golden_loss') or 0:.3f}->{cand.get('golden_loss') or 0:.3f}"
                   if cand else "-")
        data = m.get("dataset", {})
        corrections = (f"corrections trained {data['corrections_trained']} held out "
                       f"{data['corrections_heldout']} carried over "
                       f"{data['corrections_carried_over']}"
                       + (f" (gate on {data['rephrasings']} rephrasings)"
                          if data.get("rephrasings") else "")
                       + (f", then trained on {m['settle']['examples']} held out"
                          if r.status == "succeeded" and (m.get("settle") or {}).get("kept")
                          else "")
                       if "corrections_trained" in data else "corrections -")
        typer.echo(f"#{r.id} {r.status:<9} {r.trigger:<9} {r.adapter_name or '-':<10} "
                   f"{r.started_at:%Y-%m-%d %H:%M} {metrics}  {corrections}  "
                   f"log={r.log_path or '-'}" + (f"\n    {r.error}" if r.error else ""))


def train(now: Annotated[bool, typer.Option("--now", help="run one cycle now")] = False) -> None:
    """Run one learning-loop cycle by hand (the scheduler's code path)."""
    from chatloop.app import loop_config

    if not now:
        die("the scheduler starts runs; pass --now to run one cycle by hand")
    setup_logging()
    settings = load_settings()

    async def main() -> Any:
        async with database() as (_, sessions):
            return await cycle(settings, sessions, loop_config(settings), trigger="manual")

    report_cycle(run(main))


def review(
    approve: Annotated[list[int] | None, typer.Option(help="approve this correction id")] = None,
    reject: Annotated[list[int] | None, typer.Option(help="reject this correction id")] = None,
) -> None:
    """List corrections awaiting review, or approve / reject them by id."""
    from feedback import review as queue

    async def main() -> list[Any]:
        async with database() as (_, sessions), sessions() as s:
            for fid in approve or []:
                await queue.decide(s, feedback_id=fid, approve=True)
            for fid in reject or []:
                await queue.decide(s, feedback_id=fid, approve=False)
            return await queue.pending(s)

    pending = run(main)
    if approve or reject:
        typer.echo(f"decided {len(approve or []) + len(reject or [])}; {len(pending)} pending")
        return
    for p in pending:
        typer.echo(f"#{p.feedback_id} by {p.voter_id}\n  Q: {p.question}\n  A: {p.answer}\n"
                   f"  suggested: {p.correction}")
    typer.echo(f"{len(pending)} pending")
    from chatloop.cli.memory import show_voted_down

    show_voted_down()  # answer-memory entries disabled by trusted 👎


@feedback_app.command("export")
def export(
    out: Annotated[Path, typer.Option(help="JSONL file to write")] = Path("dataset.jsonl"),
) -> None:
    """Write the (redacted) dataset the next run would build, as JSONL."""
    from chatloop.app import loop_config
    from feedback import erasure
    from feedback.dataset import build_dataset
    from storage import adapters, runs

    cfg = loop_config(load_settings())

    async def build(s: Any) -> Any:
        active = (await adapters.serving(s)).active if cfg.incremental else None
        learned = await runs.lineage(s, adapter=active.name if active else None)
        return await build_dataset(s, policy=cfg.dataset, redactor=cfg.redactor,
                                   learned_by=learned)

    async def main() -> Any:  # written and registered: forget and retention rewrite it too
        async with database() as (_, sessions):
            return await erasure.export(sessions, runs_dir=cfg.runs_dir, out=out, build=build)

    ds = run(main)
    typer.echo(f"wrote {len(ds.rows())} rows to {out} (dataset {ds.hash[:12]}): "
               + json.dumps(ds.report))


def scheduler() -> None:
    """Run the learning-loop scheduler (one leader cluster-wide; others stand by)."""
    from chatloop.app import adapter_registry, loop_config, make_backend, schedule_config
    from feedback.scheduler import LearningScheduler

    setup_logging()
    settings = load_settings()
    start_telemetry(settings, "chatloop-trainer")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with database() as (engine, sessions):
            backend = make_backend(settings)
            sched = LearningScheduler(engine=engine, sessions=sessions, backend=backend,
                                      adapters=adapter_registry(settings, sessions, backend),
                                      loop=loop_config(settings),
                                      schedule=schedule_config(settings),
                                      database_url=settings.storage.database_url)
            try:
                await sched.run(stop)
            finally:
                await backend.aclose()

    run(main)


def register(app: typer.Typer) -> None:
    """Add the learning loop's commands to the `chatloop` app."""
    app.add_typer(adapters_app, name="adapters")
    app.add_typer(feedback_app, name="feedback")
    app.command()(runs)
    app.command()(train)
    app.command()(review)
    app.command()(scheduler)
