"""Operator console accounts and sessions: who may sign in to `/console`, with which role.

Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106's second recommended
parameter set); only the hash is stored. A session is a random token in the browser's signed
cookie; the database keeps its SHA-256 and when it expires, so a stolen database holds no
usable session and disabling an operator ends their sessions at once. The console's key
(signing cookies and CSRF tokens) is a per-installation random value made by the migration.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import InstallationSecret, Operator, OperatorRole, OperatorSession, utcnow

__all__ = ["OperatorError", "OperatorRole", "add_operator", "check_password", "console_key",
           "disable_operator", "end_session", "find_operator", "list_operators", "new_password",
           "open_session", "session_operator"]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
CONSOLE_KEY = "console_key"  # the installationsecret row (migration 0008)
_hasher = PasswordHasher()
# a hash of nothing anyone knows: checking an unknown name takes as long as a known one's
_DUMMY = _hasher.hash(secrets.token_urlsafe(16))


class OperatorError(ValueError):
    """A bad operator name or role, a name taken, or no such operator."""


def new_password() -> str:
    """A one-time password to hand to a new operator (128 random bits)."""
    return secrets.token_urlsafe(16)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)  # SQLite's are naive UTC


async def add_operator(session: AsyncSession, *, name: str, role: str,
                       password: str | None) -> Operator:
    """Add an operator (and commit); `password` None: they sign in only through the SSO
    header. A disabled operator's name can be added again: the account comes back enabled,
    with the new role and password and no old session."""
    if not NAME.fullmatch(name):
        raise OperatorError(f"{name!r}: a name is 1-64 letters, digits or . _ @ - ")
    if role not in tuple(OperatorRole):
        raise OperatorError(f"{role!r}: the role is reviewer or admin")
    digest = _hasher.hash(password) if password is not None else None
    existing = await find_operator(session, name)
    if existing is not None:
        if existing.disabled_at is None:
            raise OperatorError(f"operator {name} exists")
        existing.role, existing.password_hash, existing.disabled_at = role, digest, None
        await session.commit()
        return existing
    op = Operator(name=name, role=role, password_hash=digest)
    session.add(op)
    try:
        await session.commit()
    except IntegrityError:  # added meanwhile by someone else
        await session.rollback()
        raise OperatorError(f"operator {name} exists") from None
    return op


async def find_operator(session: AsyncSession, name: str) -> Operator | None:
    stmt = select(Operator).where(Operator.name == name)
    return (await session.execute(stmt.execution_options(populate_existing=True))
            ).scalar_one_or_none()


async def list_operators(session: AsyncSession) -> list[Operator]:
    return list((await session.execute(select(Operator).order_by(Operator.name))).scalars())


async def disable_operator(session: AsyncSession, name: str) -> None:
    """Disable an operator and end their sessions (and commit)."""
    op = await find_operator(session, name)
    if op is None:
        raise OperatorError(f"no operator named {name}")
    await session.execute(update(Operator).where(Operator.id == op.id)
                          .values(disabled_at=utcnow()))
    await session.execute(delete(OperatorSession).where(OperatorSession.operator_id == op.id))
    await session.commit()


async def check_password(session: AsyncSession, *, name: str, password: str
                         ) -> Operator | None:
    """The enabled operator with this name and password, else None (in about the same time
    whether the name exists or not)."""
    op = await find_operator(session, name)
    digest = op.password_hash if op is not None and op.disabled_at is None else None
    try:
        _hasher.verify(digest or _DUMMY, password)
    except (VerificationError, InvalidHashError):
        return None
    if digest is None or op is None:
        return None
    if _hasher.check_needs_rehash(digest):
        op.password_hash = _hasher.hash(password)
    op.last_login_at = utcnow()
    await session.commit()
    return op


async def open_session(session: AsyncSession, *, operator_id: int, lifetime: timedelta) -> str:
    """A new session for this operator (committed); returns the token for the cookie."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    await session.execute(delete(OperatorSession).where(OperatorSession.expires_at < now))
    session.add(OperatorSession(id=token_hash(token), operator_id=operator_id, created_at=now,
                                expires_at=now + lifetime))
    await session.commit()
    return token


async def session_operator(session: AsyncSession, token: str) -> Operator | None:
    """The enabled operator whose unexpired session this token opened, else None."""
    stmt = (select(Operator, OperatorSession.expires_at)
            .join(OperatorSession, OperatorSession.operator_id == Operator.id)
            .where(OperatorSession.id == token_hash(token), Operator.disabled_at.is_(None)))
    found = (await session.execute(stmt)).one_or_none()
    if found is None or _aware(found[1]) <= utcnow():
        return None
    return found[0]


async def end_session(session: AsyncSession, token: str) -> None:
    await session.execute(delete(OperatorSession).where(OperatorSession.id == token_hash(token)))
    await session.commit()


async def console_key(session: AsyncSession) -> str:
    """The installation's console key (migration 0008 made it)."""
    stmt = select(InstallationSecret.value).where(InstallationSecret.name == CONSOLE_KEY)
    value = (await session.execute(stmt)).scalar_one_or_none()
    if value is None:
        raise LookupError("no console key: run `chatloop db upgrade`")
    return value
