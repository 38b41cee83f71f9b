"""Web chat identities: a random id per browser, issued by the server in a signed cookie.

The browser never chooses who it is: the cookie carries an id the server made and signed
(HMAC-SHA256 with CHATLOOP_WEBCHAT_SECRET), HttpOnly (page scripts cannot read or copy it)
and SameSite=Strict (other sites cannot send it). A missing or tampered cookie gets a new
id, so a forged one is just a new anonymous person.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

from starlette.requests import Request
from starlette.responses import Response

COOKIE = "chatloop_id"
MAX_AGE_S = 365 * 24 * 3600
_ID = re.compile(r"[A-Za-z0-9_-]{22}")  # secrets.token_urlsafe(16)
_PURPOSE = b"chatloop web identity\0"  # this key signs nothing else


class WebIdentities:
    """Issues and checks the identity cookies of one deployment (one secret)."""

    def __init__(self, secret: str) -> None:
        if len(secret) < 16:
            raise ValueError("the web chat's identity secret needs at least 16 characters")
        self._key = secret.encode()

    def of(self, request: Request) -> str | None:
        """The browser's id if its cookie is one this server signed, else None."""
        uid, _, mac = (request.cookies.get(COOKIE) or "").rpartition(".")
        if _ID.fullmatch(uid) and hmac.compare_digest(mac.encode(), self._mac(uid).encode()):
            return uid
        return None

    @staticmethod
    def issue() -> str:
        """A new anonymous id (128 random bits)."""
        return secrets.token_urlsafe(16)

    def give(self, response: Response, uid: str, request: Request) -> None:
        """Set the cookie carrying `uid` on `response` (Secure when served over HTTPS)."""
        response.set_cookie(COOKIE, f"{uid}.{self._mac(uid)}", max_age=MAX_AGE_S, path="/",
                            httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")

    def _mac(self, uid: str) -> str:
        digest = hmac.new(self._key, _PURPOSE + uid.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
