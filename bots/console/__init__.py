"""The operator console under /console: review queue, conversations, quality, training.

Server-rendered pages (Jinja2 templates, SVG charts, one small vendored script for keyboard
shortcuts under static/); operators sign in with accounts from `chatloop operators add`
(see auth.py). The learning loop's operations it triggers (review decisions, the canary's
state, forget) are handed in by the composition root (`Operations`), as the gateway imports
no training code.
"""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bots.console.ops import CanaryView, Operations

__all__ = ["CanaryView", "Console", "Operations"]


class Console:
    """Plugged into the gateway like a channel: routes under /console, nothing to start."""

    name = "console"

    def __init__(self, sessions: async_sessionmaker[AsyncSession], ops: Operations, *,
                 session_hours: float = 8.0, user_header: str | None = None,
                 trusted_proxies: tuple[str, ...] | list[str] = (),
                 login_attempts: int = 5) -> None:
        from bots.console.auth import Auth

        self.sessions, self.ops = sessions, ops
        self.auth = Auth(sessions, session_hours=session_hours, user_header=user_header,
                         trusted_proxies=trusted_proxies, login_attempts=login_attempts)

    def routes(self) -> APIRouter:
        from bots.console.web import router

        return router(self.auth, self.sessions, self.ops)

    async def start(self) -> None:
        await self.auth.key()  # an un-migrated database fails here, at start-up

    async def stop(self) -> None:
        return None
