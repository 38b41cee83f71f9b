"""The Slack channel (slack-bolt): HTTP Events API or Socket Mode, streamed threaded answers."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from slack_bolt.async_app import AsyncApp

from bots.limits import shared_buckets
from bots.slack.api import SlackApi, make_client
from bots.slack.channel import SlackChannel
from bots.slack.pacing import Pacer, Pacing

if TYPE_CHECKING:
    from bots.core import ConversationCore
    from chatloop.settings import SlackSettings

__all__ = ["SlackChannel", "SlackConfigError", "build_channel"]


class SlackConfigError(ValueError):
    """The Slack settings are incomplete; the message says what to set."""


def build_channel(settings: SlackSettings, *, core: ConversationCore,
                  max_answers: int) -> SlackChannel:
    """The Slack channel on `core`, as `settings` (its section) configure it, with at most
    `max_answers` answers in progress (the composition root: `chatloop.app.build_channels`)."""
    s = settings
    if s.bot_token is None:
        raise SlackConfigError("set SLACK_BOT_TOKEN to enable Slack")
    app_token = s.app_token.get_secret_value() if s.app_token else None
    if app_token is None and s.signing_secret is None:
        raise SlackConfigError(
            "set SLACK_SIGNING_SECRET (HTTP Events API) or SLACK_APP_TOKEN (Socket Mode)")
    client = make_client(s.bot_token.get_secret_value(), base_url=s.api_base)
    secret = s.signing_secret.get_secret_value() if s.signing_secret else ""
    app = AsyncApp(client=client, signing_secret=secret, process_before_response=True,
                   request_verification_enabled=app_token is None)
    workspace = hashlib.sha256(s.bot_token.get_secret_value().encode()).hexdigest()[:16]
    pacing = Pacing(edits=Pacer(per_minute=s.updates_per_minute, buckets=shared_buckets(),
                                workspace=workspace),  # one bot token per workspace
                    interval_s=s.update_interval_s, streaming=s.streaming,
                    message_chars=s.message_chars)
    return SlackChannel(core=core, app=app, api=SlackApi(client), pacing=pacing,
                        app_token=app_token, agent_corrections=s.agent_corrections,
                        max_answers=max_answers, signing_secret=secret or None,
                        handoff_channel=s.handoff_channel)
