"""`chatloop operators add|list|disable`: the operator console's accounts.

Registered on the `chatloop` app by chatloop/cli/__init__.py; errors become one line (die).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from chatloop.cli.common import database, die, run

operators_app = typer.Typer(no_args_is_help=True,
                            help="Operator console accounts: add, list, disable.")


@operators_app.command("add")
def operators_add(
    name: str,
    role: Annotated[str, typer.Option(help="reviewer (review, correct) or admin (also promote, "
                                           "roll back, forget, manage operators)")] = "reviewer",
) -> None:
    """Add an operator (or re-enable a disabled one) and print a one-time password."""
    from storage import audit, operators

    password = operators.new_password()

    async def main() -> None:
        async with database() as (_, sessions), sessions() as s:
            await operators.add_operator(s, name=name, role=role, password=password)
            await audit.log(s, actor=audit.cli_actor(), action="operator_add",
                            target=f"operator:{name}", detail={"role": role})

    try:
        run(main)
    except operators.OperatorError as exc:
        die(str(exc))
    typer.echo(f"operator {name} ({role}) added; one-time password (shown only now):")
    typer.echo(password)


@operators_app.command("list")
def operators_list() -> None:
    """Every operator with role, state and last sign-in."""
    from storage import operators

    async def main() -> list[Any]:
        async with database() as (_, sessions), sessions() as s:
            return await operators.list_operators(s)

    typer.echo(f"{'NAME':<24}{'ROLE':<10}{'STATE':<10}LAST SIGN-IN")
    for op in run(main):
        state = "disabled" if op.disabled_at else "enabled"
        last = f"{op.last_login_at:%Y-%m-%d %H:%M}" if op.last_login_at else "-"
        typer.echo(f"{op.name:<24}{op.role:<10}{state:<10}{last}")


@operators_app.command("disable")
def operators_disable(name: str) -> None:
    """Disable an operator: they cannot sign in, and their sessions end now."""
    from storage import audit, operators

    async def main() -> None:
        async with database() as (_, sessions), sessions() as s:
            await operators.disable_operator(s, name)
            await audit.log(s, actor=audit.cli_actor(), action="operator_disable",
                            target=f"operator:{name}")

    try:
        run(main)
    except operators.OperatorError as exc:
        die(str(exc))
    typer.echo(f"operator {name} disabled")


def register(app: typer.Typer) -> None:
    """Add the `operators` commands to the `chatloop` app."""
    app.add_typer(operators_app, name="operators")
