"""What every `chatloop` command shares: the settings, logging, and the one-line exit."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import typer
from pydantic import ValidationError

from chatloop.settings import Settings, describe_error


def load_settings() -> Settings:
    """The settings from the environment and `.env`; a bad one exits naming its variable."""
    try:
        return Settings()
    except ValidationError as exc:
        die(f"bad configuration: {describe_error(exc)}")


def die(message: str, code: int = 2) -> NoReturn:
    """Print `chatloop: message` on stderr and exit with `code`."""
    typer.echo(f"chatloop: {message}", err=True)
    raise typer.Exit(code)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
