"""Slack Web API calls counted by method and status (`chatloop_platform_api_calls_total`).

slack_sdk offers each response (and each connection error) to its retry handlers in order;
`CountCalls`, the first of them, counts it and never asks for a retry, so every attempt is
counted, the 429s that the next handler retries included.
"""

from __future__ import annotations

from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState

from chatloop.telemetry.metrics import PLATFORM_CALLS
from chatloop.telemetry.tracing import STATE


def status_of(response: HttpResponse | None) -> str:
    """The HTTP status, or Slack's error code when it answered 200 with ok=false."""
    if response is None:
        return "network"
    body = response.body if isinstance(response.body, dict) else {}
    if response.status_code == 200 and body.get("ok") is False:
        return str(body.get("error") or "error")
    return str(response.status_code)


class CountCalls(AsyncRetryHandler):
    async def can_retry_async(self, *, state: RetryState, request: HttpRequest,
                              response: HttpResponse | None = None,
                              error: Exception | None = None) -> bool:
        if STATE.metrics:
            method = request.url.rstrip("/").rsplit("/", 1)[-1]
            PLATFORM_CALLS.labels("slack", method, status_of(response)).inc()
        return False
