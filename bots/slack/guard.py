"""Checks on a raw Slack request before slack-bolt parses it (pure, no network).

Bolt decodes and parses the body before its verification middleware runs, so an unsigned
`{` or a body that is not UTF-8 would end in a 500 with a traceback, and a bad signature is
logged by bolt at INFO with the whole body. Here the signature is checked first on the raw
bytes, then the body is parsed the way bolt will: what fails gets 401 or 400 and a reason
that never quotes the body.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass

from slack_bolt.request.internals import parse_body

MAX_AGE_S = 300  # Slack: refuse requests more than five minutes old (replays)


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str


def signed(raw: bytes, headers: Mapping[str, str], secret: str, *,
           now: float | None = None) -> bool:
    """Slack's v0 signature over the raw bytes, fresh within five minutes. (slack_sdk's
    SignatureVerifier decodes the body as UTF-8 first, so a body that is not fails there.)"""
    timestamp = headers.get("x-slack-request-timestamp") or ""
    signature = headers.get("x-slack-signature") or ""
    if not timestamp.isdigit():
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > MAX_AGE_S:
        return False
    base = b"v0:" + timestamp.encode() + b":" + raw
    expected = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))


def check_request(raw: bytes, headers: Mapping[str, str],
                  secret: str | None) -> Refusal | None:
    """None if bolt may handle the request; else the status and a short reason.

    `secret` None: no signatures (Socket Mode has no HTTP endpoint; tests only)."""
    if secret is not None and not signed(raw, headers, secret):
        return Refusal(401, "missing, stale or invalid signature")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Refusal(400, "body is not UTF-8")
    try:
        parsed = parse_body(text, headers.get("content-type"))
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return Refusal(400, "body is not a Slack payload (bad JSON or nesting)")
    if not isinstance(parsed, dict):
        return Refusal(400, "body is not a Slack payload (not an object)")
    return None
