"""Who is at the console: signed session cookies, CSRF tokens, the SSO header, login limits.

- The session cookie carries a random token and its HMAC under the installation's console
  key (storage.operators); the database keeps the token's SHA-256 and its expiry. The cookie
  is HttpOnly, SameSite=Strict, scoped to /console, Secure over HTTPS.
- Every form carries a CSRF token, the HMAC of the session's token (or, behind the SSO
  proxy, of the operator's name); the sign-in form's is bound to a pre-login cookie.
- Behind an SSO proxy, the header named by CHATLOOP_CONSOLE_USER_HEADER names the operator,
  believed only from CHATLOOP_CONSOLE_TRUSTED_PROXIES; the name must be an enabled operator
  (their role is the account's).
- Failed sign-ins are limited per client address and per name (a sliding window, per
  gateway process).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import Request
from starlette.responses import Response

from storage import operators
from storage.models import OperatorRole

COOKIE = "chatloop_console"
LOGIN_COOKIE = "chatloop_console_login"
PATH = "/console"


@dataclass(frozen=True, slots=True)
class Who:
    """A signed-in operator."""

    name: str
    role: str
    csrf: str
    token: str | None = None  # the session's (None: signed in by the SSO header)

    @property
    def admin(self) -> bool:
        return self.role == OperatorRole.ADMIN

    @property
    def identity(self) -> str:
        """The operator as an identity (`console:NAME`): the voter of their corrections
        and the actor of their audited actions."""
        return f"console:{self.name}"


class LoginLimiter:
    """At most `attempts` failed sign-ins per `window_s` per key (address, name)."""

    def __init__(self, attempts: int, window_s: float = 300.0) -> None:
        self.attempts, self.window_s = attempts, window_s
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures.setdefault(key, deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def retry_after(self, *keys: str) -> float:
        """Seconds until another attempt is allowed (0: now)."""
        now = time.monotonic()
        wait = 0.0
        for key in keys:
            q = self._recent(key, now)
            if len(q) >= self.attempts:
                wait = max(wait, q[0] + self.window_s - now)
        if len(self._failures) > 10_000:  # forget idle keys
            self._failures = {k: q for k, q in self._failures.items() if q}
        return wait

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        for key in keys:
            self._recent(key, now).append(now)


class Auth:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, session_hours: float,
                 user_header: str | None = None, trusted_proxies: Sequence[str] = (),
                 login_attempts: int = 5) -> None:
        self._sessions = sessions
        self.lifetime_s = session_hours * 3600
        self.user_header = user_header
        self._proxies = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]
        self.limiter = LoginLimiter(login_attempts)
        self._key: bytes | None = None
        self._lock = asyncio.Lock()

    async def key(self) -> bytes:
        if self._key is None:
            async with self._lock:
                if self._key is None:
                    async with self._sessions() as s:
                        self._key = (await operators.console_key(s)).encode()
        return self._key

    async def mac(self, purpose: str, value: str) -> str:
        digest = hmac.new(await self.key(), f"chatloop console {purpose}\0{value}".encode(),
                          hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def _from_proxy(self, request: Request) -> bool:
        host = request.client.host if request.client else None
        if host is None:
            return False
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in self._proxies)

    async def identify(self, request: Request) -> Who | None:
        """The operator making this request, or None."""
        if self.user_header and self._from_proxy(request):
            name = request.headers.get(self.user_header, "").strip()
            if name:
                async with self._sessions() as s:
                    op = await operators.find_operator(s, name)
                if op is None or op.disabled_at is not None:
                    return None
                return Who(op.name, op.role, await self.mac("csrf-user", op.name))
        token, _, mac = (request.cookies.get(COOKIE) or "").rpartition(".")
        if not token or not hmac.compare_digest(mac, await self.mac("session", token)):
            return None
        async with self._sessions() as s:
            op = await operators.session_operator(s, token)
        if op is None:
            return None
        return Who(op.name, op.role, await self.mac("csrf", token), token)

    async def check_csrf(self, who: Who, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), who.csrf)

    # sign-in

    async def login_form(self, request: Request) -> tuple[str, str]:
        """(the pre-login cookie's nonce, the sign-in form's CSRF token bound to it)."""
        nonce = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(16)
        return nonce, await self.mac("login", nonce)

    @staticmethod
    def set_login_cookie(request: Request, response: Response, nonce: str) -> None:
        response.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, path=PATH, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")

    async def check_login_token(self, request: Request, token: str | None) -> bool:
        nonce = request.cookies.get(LOGIN_COOKIE)
        return bool(nonce and token) and hmac.compare_digest(
            str(token), await self.mac("login", nonce or ""))

    async def sign_in(self, response: Response, request: Request, operator_id: int) -> None:
        async with self._sessions() as s:
            token = await operators.open_session(s, operator_id=operator_id,
                                                 lifetime=timedelta(seconds=self.lifetime_s))
        response.set_cookie(COOKIE, f"{token}.{await self.mac('session', token)}",
                            max_age=int(self.lifetime_s), path=PATH, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        response.delete_cookie(LOGIN_COOKIE, path=PATH)

    async def sign_out(self, response: Response, who: Who) -> None:
        if who.token is not None:
            async with self._sessions() as s:
                await operators.end_session(s, who.token)
        response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="strict")
