"""The channel-independent conversation core: the only way channels reach storage.

InboundMessage -> dedupe -> history -> prompt -> route -> stream into the channel's
ReplySink -> store the answer with its metadata -> feedback controls. Channels convert
platform payloads to core calls and render core results to platform calls.

- `types`: the contract (messages, sinks, routers, typed results, limits)
- `conversation`: `ConversationCore`, the facade every channel calls
- `turns`: generating, streaming, storing and delivering one answer
- `leases`, `recovery`: holding the events being worked on; resuming crashed turns
- `feedback`: votes and corrections, stored with their delivery in one transaction
- `payload`: the versioned stored form of an inbound message
"""

from bots.core.conversation import HELP_TEXT, ConversationCore
from bots.core.recovery import MAX_RESUMES
from bots.core.turns import APOLOGIES, APOLOGY
from bots.core.types import (
    PRIVATE_CHANNELS,
    Accepted,
    CoreLimits,
    FeedbackResult,
    InboundMessage,
    Outcome,
    ReplySink,
    Resumed,
    Router,
    SinkFor,
    StaticRouter,
    TurnResult,
    channel_of,
    default_owner,
    identity,
)
from storage.db import unavailable
from storage.feedback import UnknownAnswer

__all__ = [
    "APOLOGIES", "APOLOGY", "HELP_TEXT", "MAX_RESUMES", "Accepted", "ConversationCore",
    "CoreLimits", "FeedbackResult", "InboundMessage", "Outcome", "PRIVATE_CHANNELS", "ReplySink",
    "Resumed", "Router", "SinkFor", "StaticRouter", "TurnResult", "UnknownAnswer", "channel_of",
    "default_owner", "identity", "unavailable",
]
