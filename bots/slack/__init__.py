"""The Slack channel (slack-bolt): HTTP Events API or Socket Mode, streamed threaded answers."""

from __future__ import annotations

from typing import Any

from slack_bolt.async_app import AsyncApp

from bots.slack.api import SlackApi, make_client
from bots.slack.channel import SlackChannel
from bots.slack.pacing import Pacer, Pacing

__all__ = ["SlackChannel", "SlackConfigError", "build_channel"]


class SlackConfigError(ValueError):
    """The Slack settings are incomplete; the message says what to set."""


def build_channel(services: Any) -> SlackChannel:
    """The Slack channel for the composition root (`chatloop.app.build_channels`)."""
    s = services.settings
    if s.slack_bot_token is None:
        raise SlackConfigError("set SLACK_BOT_TOKEN to enable Slack")
    app_token = s.slack_app_token.get_secret_value() if s.slack_app_token else None
    if app_token is None and s.slack_signing_secret is None:
        raise SlackConfigError(
            "set SLACK_SIGNING_SECRET (HTTP Events API) or SLACK_APP_TOKEN (Socket Mode)")
    client = make_client(s.slack_bot_token.get_secret_value(), base_url=s.slack_api_base)
    secret = s.slack_signing_secret.get_secret_value() if s.slack_signing_secret else ""
    app = AsyncApp(client=client, signing_secret=secret, process_before_response=True,
                   request_verification_enabled=app_token is None)
    pacing = Pacing(edits=Pacer(per_minute=s.slack_updates_per_minute),
                    interval_s=s.slack_update_interval_s, streaming=s.slack_streaming,
                    message_chars=s.slack_message_chars)
    channel = SlackChannel(core=services.core, app=app, api=SlackApi(client), pacing=pacing,
                           app_token=app_token, agent_corrections=s.slack_agent_corrections,
                           max_answers=2 * s.max_concurrent_generations)
    services.extra["slack"] = channel
    return channel
