"""The Slack Web API calls the channel makes, wrapped, with Slack errors mapped in one place."""

from __future__ import annotations

from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bots.slack.metrics import CountCalls

DEFAULT_BASE = "https://slack.com/api/"
# the bot cannot post there at all: record it, do not retry (S4)
_UNDELIVERABLE = {
    "channel_not_found", "not_in_channel", "is_archived", "channel_is_archived",
    "invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired",
    "missing_scope", "restricted_action", "team_access_not_granted", "ekm_access_denied",
}
_MESSAGE_GONE = {"message_not_found", "cant_update_message", "edit_window_closed"}


class SlackError(Exception):
    """A Web API call failed for good (after the client's retries); `code` is Slack's error."""

    def __init__(self, method: str, code: str) -> None:
        super().__init__(f"{method}: {code}")
        self.method, self.code = method, code


class Undeliverable(SlackError):
    """The bot may not post in that conversation (gone, archived, not a member, bad token)."""


class MessageGone(SlackError):
    """The message to edit no longer exists or can no longer be edited."""


def _mapped(method: str, exc: Exception) -> SlackError:
    if isinstance(exc, SlackApiError):
        code = str(exc.response.get("error") or f"http_{exc.response.status_code}")
    else:
        code = "connection_error"
    if code in _UNDELIVERABLE:
        return Undeliverable(method, code)
    if code in _MESSAGE_GONE:
        return MessageGone(method, code)
    return SlackError(method, code)


def make_client(token: str, *, base_url: str | None, rate_limit_retries: int = 3) -> AsyncWebClient:
    """An AsyncWebClient that honours 429 Retry-After and retries broken connections."""
    return AsyncWebClient(
        token=token, base_url=base_url or DEFAULT_BASE, timeout=15,
        retry_handlers=[
            CountCalls(),  # first: sees every attempt (chatloop_platform_api_calls_total)
            AsyncConnectionErrorRetryHandler(max_retry_count=2),
            AsyncRateLimitErrorRetryHandler(max_retry_count=rate_limit_retries),
            AsyncServerErrorRetryHandler(max_retry_count=1),
        ],
    )


class SlackApi:
    """The few Web API methods the channel uses; every failure is a `SlackError`."""

    def __init__(self, client: AsyncWebClient) -> None:
        self.client = client

    async def open(self) -> None:
        """Share one connection pool (slack_sdk opens a connection per call without one)."""
        if self.client.session is None or self.client.session.closed:
            self.client.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.client.timeout))

    async def close(self) -> None:
        if self.client.session is not None:
            await self.client.session.close()

    async def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        call = getattr(self.client, method.replace(".", "_"))  # slack_sdk's own method
        try:
            response = await call(**{k: v for k, v in kwargs.items() if v is not None})
        except (TimeoutError, SlackClientError, aiohttp.ClientError) as exc:
            raise _mapped(method, exc) from exc
        return dict(response.data) if isinstance(response.data, dict) else {}

    async def auth_test(self) -> dict[str, Any]:
        return await self._call("auth.test")

    async def post(self, *, channel: str, thread_ts: str | None, text: str,
                   blocks: list[dict[str, Any]] | None = None) -> str:
        data = await self._call("chat.postMessage", channel=channel, thread_ts=thread_ts,
                                text=text, blocks=blocks, unfurl_links=False,
                                unfurl_media=False)
        return str(data["ts"])

    async def update(self, *, channel: str, ts: str, text: str,
                     blocks: list[dict[str, Any]]) -> None:
        await self._call("chat.update", channel=channel, ts=ts, text=text, blocks=blocks)

    async def start_stream(self, *, channel: str, thread_ts: str, team_id: str | None,
                           user_id: str | None) -> str:
        data = await self._call("chat.startStream", channel=channel, thread_ts=thread_ts,
                                recipient_team_id=team_id, recipient_user_id=user_id)
        return str(data["ts"])

    async def append_stream(self, *, channel: str, ts: str, markdown_text: str) -> None:
        await self._call("chat.appendStream", channel=channel, ts=ts,
                         markdown_text=markdown_text)

    async def stop_stream(self, *, channel: str, ts: str, markdown_text: str | None,
                          blocks: list[dict[str, Any]] | None) -> None:
        await self._call("chat.stopStream", channel=channel, ts=ts,
                         markdown_text=markdown_text or None, blocks=blocks)

    async def open_view(self, *, trigger_id: str, view: dict[str, Any]) -> None:
        await self._call("views.open", trigger_id=trigger_id, view=view)
