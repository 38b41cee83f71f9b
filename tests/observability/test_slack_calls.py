"""Slack Web API calls are counted per attempt: a 429 that slack_sdk retries shows too."""

from __future__ import annotations

from typing import Any

import pytest

from bots.slack.api import SlackApi, SlackError, make_client
from tests.fakes.slack_api import FakeSlack


def calls(scraped: dict, method: str, status: str) -> float:
    labels = (("channel", "slack"), ("method", method), ("status", status))
    return scraped.get(("chatloop_platform_api_calls_total", labels), 0.0)


async def test_slack_calls_by_method_and_status(spans: Any, scrape: Any) -> None:
    async with FakeSlack().serve() as fake:
        api = SlackApi(make_client(fake.token, base_url=fake.url))
        await api.open()
        try:
            before = await scrape()
            fake.rate_limit("chat.postMessage", times=1, retry_after=0)
            await api.post(channel="C1", thread_ts=None, text="hello")
            fake.fail("chat.update", "message_not_found")
            with pytest.raises(SlackError):
                await api.update(channel="C1", ts="1.0", text="x", blocks=[])
            after = await scrape()
        finally:
            await api.close()
    assert calls(after, "chat.postMessage", "429") - calls(before, "chat.postMessage", "429") == 1
    assert calls(after, "chat.postMessage", "200") - calls(before, "chat.postMessage", "200") == 1
    assert calls(after, "chat.update", "message_not_found") - \
        calls(before, "chat.update", "message_not_found") == 1
